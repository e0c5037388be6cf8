"""The attention block (``*``): causal GQA with no positional encoding."""
from __future__ import annotations

import torch
from torch import nn

from ..backend import BackendConfig, resolve_attn
from ..ops.attention import eager_attention, sdpa_attention
from .linear import Linear, add_linear


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int, backend: BackendConfig) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, bias=bias)

    def forward(self, x: torch.Tensor, meta, cache=None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output; with ``residual``, ``residual + output``."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None and meta.decode_pos is not None:
            k, v = cache.write_kv_at(self.layer_idx, k, v, meta.decode_pos)
        elif cache is not None:
            k, v = cache.update_kv(self.layer_idx, k, v, meta.past_len)
        impl = resolve_attn(self.backend, x.device.type, packed=meta.is_packed and cache is None,
                            dtype=q.dtype, head_dim=self.head_dim)
        if impl == "flex" and meta.is_packed:
            from ..ops.flex import flex_document_attention

            out = flex_document_attention(q, k, v, meta.flex_block_mask(), self.scale)
        elif impl == "eager":
            out = eager_attention(q, k, v, meta.attn_mask, self.scale)
        else:
            out = sdpa_attention(q, k, v, meta.attn_mask, self.scale)
        return add_linear(residual, self.o_proj, out.transpose(1, 2).reshape(b, s, -1))
