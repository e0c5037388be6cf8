"""Batch metadata shared by every mixer: one object carries what differs between BSHD and THD.

* BSHD: ``[B, S]`` tokens, an optional 2D padding mask (1 = token, 0 = padding).
* THD: packed tokens ``[T]`` (held as ``[1, T]``) with ``cu_seqlens``; every mixer sees ``seq_idx``
  (the document of each token) so that no state or attention crosses a document boundary.

The mixers never branch on the layout: Mamba reads ``padding_mask`` and ``seq_idx``, attention reads
``attn_mask`` (None means plain causal attention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass
class BatchMeta:
    batch_size: int
    seq_len: int
    past_len: int = 0
    padding_mask: torch.Tensor | None = None  # [B, S] bool, current tokens only; None = no padding
    kv_padding_mask: torch.Tensor | None = None  # [B, past_len + S] bool
    seq_idx: torch.Tensor | None = None  # [B, S] int32, THD only
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    position_ids: torch.Tensor | None = None
    decode_pos: torch.Tensor | None = None  # static-shape decode: device index of the step being written
    residual_writable: bool = False  # a block may add its output into its input (set by run_layers)
    _attn_mask: torch.Tensor | None = None
    _attn_mask_built: bool = False
    _flex_mask: object = None

    @property
    def is_packed(self) -> bool:
        return self.seq_idx is not None

    @property
    def attn_mask(self) -> torch.Tensor | None:
        """Boolean ``[B, 1, S, past+S]`` mask, or None where plain causal attention is exact."""
        if not self._attn_mask_built:
            self._attn_mask = self._build_attn_mask()
            self._attn_mask_built = True
        return self._attn_mask

    def flex_block_mask(self):
        """FlexAttention block mask of the packed documents, built once and shared by all layers."""
        if self._flex_mask is None:
            from .ops.flex import document_block_mask

            self._flex_mask = document_block_mask(self.seq_idx)
        return self._flex_mask

    def _build_attn_mask(self) -> torch.Tensor | None:
        plain = self.kv_padding_mask is None and self.seq_idx is None
        if plain and (self.past_len == 0 or self.seq_len == 1):
            return None
        device = self.kv_padding_mask.device if self.kv_padding_mask is not None else (
            self.seq_idx.device if self.seq_idx is not None else None)
        kv_len = self.past_len + self.seq_len
        mask = causal_bool_mask(self.seq_len, kv_len, device)[None, None].expand(self.batch_size, 1, -1, -1)
        if self.kv_padding_mask is not None:
            mask = mask & self.kv_padding_mask[:, None, None, :].bool()
        if self.seq_idx is not None:
            mask = mask & (self.seq_idx[:, None, :, None] == self.seq_idx[:, None, None, :])
        # A padding query may have no visible key at all; let it see itself so softmax stays finite.
        diag = torch.zeros_like(mask)
        diag[..., torch.arange(self.seq_len), self.past_len + torch.arange(self.seq_len)] = True
        return torch.where(mask.any(-1, keepdim=True), mask, diag)


def causal_bool_mask(query_len: int, kv_len: int, device: torch.device | None = None) -> torch.Tensor:
    """``[q, kv]``: query i (at absolute position kv_len - q + i) sees keys up to itself."""
    q = torch.arange(query_len, device=device)[:, None] + (kv_len - query_len)
    return torch.arange(kv_len, device=device)[None, :] <= q


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    positions = torch.arange(total, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens.to(torch.int64), positions, right=True) - 1).to(torch.int32)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, name: str = "cu_seqlens") -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise InputError(f"{name} must be a 1-D tensor [num_seqs + 1], got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise InputError(f"{name} must start at 0, got {cu[0]}")
    if any(b <= a for a, b in zip(cu, cu[1:])):
        raise InputError(f"{name} must be strictly increasing, got {cu}")
    if cu[-1] != total:
        raise InputError(f"{name} must end at the number of packed tokens ({total}), got {cu[-1]}")


def check_true_lengths(cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor) -> None:
    """With padding, ``cu_seqlens`` holds the true lengths: one per padded slot, each fitting in it."""
    if cu_seqlens.dim() != 1 or cu_seqlens.shape != cu_seqlens_padded.shape:
        raise InputError(f"cu_seqlens {tuple(cu_seqlens.shape)} and cu_seqlens_padded {tuple(cu_seqlens_padded.shape)} "
                         "must both be [num_seqs + 1]")
    cu, padded = cu_seqlens.tolist(), cu_seqlens_padded.tolist()
    if cu[0] != 0:
        raise InputError(f"cu_seqlens must start at 0, got {cu[0]}")
    lens = [b - a for a, b in zip(cu, cu[1:])]
    slots = [b - a for a, b in zip(padded, padded[1:])]
    if any(n < 0 or n > s for n, s in zip(lens, slots)):
        raise InputError(f"cu_seqlens lengths {lens} must be >= 0 and fit in the padded lengths {slots} "
                         "(cu_seqlens_padded)")


def make_batch_meta(
    batch_size: int,
    seq_len: int,
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    past_len: int = 0,
    qkv_format: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_padded: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    seq_idx: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> BatchMeta:
    """Validate the layout arguments once and describe the batch for the mixers."""
    packed = qkv_format == "thd" or cu_seqlens is not None
    if qkv_format not in (None, "bshd", "thd"):
        raise InputError(f"qkv_format must be 'bshd' or 'thd', got {qkv_format!r}")
    meta = BatchMeta(batch_size=batch_size, seq_len=seq_len, past_len=past_len)
    if packed:
        if batch_size != 1:
            raise InputError(f"packed (THD) input must be [T] or [1, T], got batch size {batch_size}")
        if past_len:
            raise InputError("packed (THD) input cannot continue from a cache")
        layout = cu_seqlens_padded if cu_seqlens_padded is not None else cu_seqlens
        if layout is None and seq_idx is None:
            raise InputError("qkv_format='thd' needs cu_seqlens (or seq_idx)")
        if layout is not None:
            check_cu_seqlens(layout, seq_len, "cu_seqlens_padded" if cu_seqlens_padded is not None else "cu_seqlens")
            seq_idx = seq_idx_from_cu_seqlens(layout.to(device), seq_len)[None]
        if cu_seqlens is not None and cu_seqlens_padded is not None:
            check_true_lengths(cu_seqlens, cu_seqlens_padded)
        meta.seq_idx = seq_idx.to(device=device, dtype=torch.int32).reshape(1, seq_len)
        meta.cu_seqlens = cu_seqlens
        meta.max_seqlen = max_seqlen
        if cu_seqlens is not None and cu_seqlens_padded is not None:
            # Tokens between a document's end and the next padded boundary are padding.
            starts = cu_seqlens_padded.to(device)[:-1]
            lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
            offset = torch.arange(seq_len, device=device) - starts[meta.seq_idx[0].long()]
            padding_mask = (offset < lens[meta.seq_idx[0].long()])[None]
        if position_ids is None:
            starts = (cu_seqlens_padded if cu_seqlens_padded is not None else cu_seqlens)
            if starts is not None:
                starts = starts.to(device)[:-1]
                position_ids = (torch.arange(seq_len, device=device) - starts[meta.seq_idx[0].long()])[None]
    mask2d = padding_mask if padding_mask is not None else attention_mask
    if mask2d is not None:
        if mask2d.dim() != 2 or mask2d.shape[0] != batch_size or mask2d.shape[1] not in (seq_len, past_len + seq_len):
            raise InputError(
                f"attention/padding mask must be 2-D [batch, seq] matching the input {batch_size}x{seq_len}"
                f"{f' (+{past_len} cached)' if past_len else ''}, got {tuple(mask2d.shape)}"
            )
        mask2d = mask2d.to(device=device).bool()
        if mask2d.shape[1] == seq_len and past_len:
            mask2d = torch.cat([mask2d.new_ones(batch_size, past_len), mask2d], dim=1)
        if not bool(mask2d.all()):
            meta.kv_padding_mask = mask2d
            meta.padding_mask = mask2d[:, -seq_len:]
    if position_ids is None:
        position_ids = torch.arange(past_len, past_len + seq_len, device=device)[None].expand(batch_size, -1)
    meta.position_ids = position_ids
    return meta
