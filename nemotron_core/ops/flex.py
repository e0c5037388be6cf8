"""Document-causal attention for packed (THD) batches with FlexAttention (CUDA).

The block mask says: query i sees key j when j <= i and both tokens belong to the same document.
FlexAttention skips the fully masked blocks, so a packed batch costs what its documents cost, not
what one long sequence would. The exact masked reference on CPU is ``ops.attention`` with
``BatchMeta.attn_mask``.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def document_block_mask(seq_idx: torch.Tensor):
    """Block mask for ``seq_idx`` ``[1, T]`` (one per batch, shared by every attention layer)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = seq_idx[0]
    total = doc.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=total, KV_LEN=total, device=seq_idx.device)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float) -> torch.Tensor:
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
