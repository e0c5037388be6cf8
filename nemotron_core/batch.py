"""Batch metadata shared by every mixer: one object carries what differs between BSHD and THD.

* BSHD: ``[B, S]`` tokens, an optional 2D padding mask (1 = token, 0 = padding).
* THD: packed tokens ``[T]`` (held as ``[1, T]``) with ``cu_seqlens``; every mixer sees ``seq_idx``
  (the document of each token) so that no state or attention crosses a document boundary.
* Packed BSHD rows: ``[B, S]`` with ``seq_idx`` or NeMo's ``_packed_seq_ids`` (see ``make_batch_meta``),
  described by the same ``seq_idx`` and padding mask as THD.

The mixers never branch on the layout: Mamba reads ``padding_mask`` and ``seq_idx``, attention reads
``attn_mask`` (None means plain causal attention). Inside a ``BatchMeta`` the 2D masks are *keep*
masks (True = real token); the public ``padding_mask=`` argument has the opposite polarity (True =
padding, as in NeMo AutoModel) and is converted once, in ``make_batch_meta``.
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
    # Keep masks (True = real token), unlike forward's padding_mask argument (True = padding).
    padding_mask: torch.Tensor | None = None  # [B, S] bool, current tokens only; None = no padding
    kv_padding_mask: torch.Tensor | None = None  # [B, past_len + S] bool
    seq_idx: torch.Tensor | None = None  # [B, S] int32 document (run) index; packed batches only
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    position_ids: torch.Tensor | None = None
    decode_pos: torch.Tensor | None = None  # static-shape decode: device index of the step being written
    residual_writable: bool = False  # a block may add its output into its input (set by run_layers)
    _attn_mask: torch.Tensor | None = None
    _attn_mask_built: bool = False
    _flex_mask: object = None
    # The caller's causal_mask_mapping["full_attention"] is _attn_mask: attention must use it as given
    # (no FlexAttention document mask in its place).
    attn_mask_from_caller: bool = False

    @property
    def is_packed(self) -> bool:
        return self.seq_idx is not None

    @property
    def flex_documents(self) -> bool:
        """Whether FlexAttention's document mask (``flex_block_mask``) describes this batch exactly:
        packed, one row (the block mask is shared by the batch), and no mask from the caller."""
        return self.seq_idx is not None and self.seq_idx.shape[0] == 1 and not self.attn_mask_from_caller

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
        return see_self_if_blind(mask, self.past_len)


def see_self_if_blind(mask: torch.Tensor, past_len: int) -> torch.Tensor:
    """A boolean ``[..., q, past_len + q]`` mask where each query row that sees no key at all (a padding
    query) sees itself instead: softmax over nothing is NaN, which a later Mamba layer would carry
    into every following token. Rows with a visible key are unchanged."""
    q = mask.shape[-2]
    diag = torch.zeros_like(mask)
    diag[..., torch.arange(q), past_len + torch.arange(q)] = True
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
    packed_seq_ids: torch.Tensor | None = None,
    causal_mask: torch.Tensor | None = None,
    num_heads: int | None = None,
) -> BatchMeta:
    """Validate the layout arguments once and describe the batch for the mixers.

    The arguments are ``forward``'s, in their public conventions:

    * ``attention_mask`` ``[B, S]`` (or ``[B, past + S]``): nonzero = real token.
    * ``padding_mask`` ``[B, S]``: True = *padding* (NeMo AutoModel's ``attention_mask.bool().logical_not()``).
      With both, a token is real only where both say so.
    * THD (``qkv_format="thd"`` or ``cu_seqlens``): one row ``[1, T]`` of documents, see the module doc.
    * ``seq_idx`` ``[B, S]`` integer without THD: the document of each token of a packed BSHD row.
    * ``packed_seq_ids`` (forward's ``_packed_seq_ids``) ``[B, S]`` integer, NeMo's packed-row ids:
      document ``i`` holds ``i`` (1, 2, ...) and padding holds 0, so 0 also marks padding.
    * ``causal_mask`` (``causal_mask_mapping["full_attention"]``): see ``caller_attn_mask``.

    Documents (``seq_idx``, ``packed_seq_ids``, the THD layout; several may be given) are contiguous
    runs: a new one starts wherever any of them changes value, so the ids need not be increasing or
    distinct between rows. ``meta.seq_idx`` holds the run index (0, 1, ... per row), which is what the
    Mamba kernels assume (equal ids = one document). Packed documents cannot continue from a cache.
    """
    packed = qkv_format == "thd" or cu_seqlens is not None
    if qkv_format not in (None, "bshd", "thd"):
        raise InputError(f"qkv_format must be 'bshd' or 'thd', got {qkv_format!r}")
    meta = BatchMeta(batch_size=batch_size, seq_len=seq_len, past_len=past_len)
    keeps: list[torch.Tensor] = []  # [B, S] or [B, past + S] bool, True = real token; ANDed below
    documents: list[torch.Tensor] = []  # [B, S] ids; a document boundary wherever any one changes
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
        elif seq_idx.numel() != seq_len:
            raise InputError(f"seq_idx must hold one entry per packed token ({seq_len}), "
                             f"got shape {tuple(seq_idx.shape)}")
        if cu_seqlens is not None and cu_seqlens_padded is not None:
            check_true_lengths(cu_seqlens, cu_seqlens_padded)
        layout_idx = seq_idx.to(device=device, dtype=torch.int32).reshape(1, seq_len)  # indexes cu_seqlens
        documents.append(layout_idx)
        meta.cu_seqlens = cu_seqlens
        meta.max_seqlen = max_seqlen
        if cu_seqlens is not None and cu_seqlens_padded is not None:
            # Tokens between a document's end and the next padded boundary are padding.
            starts = cu_seqlens_padded.to(device)[:-1]
            lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
            offset = torch.arange(seq_len, device=device) - starts[layout_idx[0].long()]
            keeps.append((offset < lens[layout_idx[0].long()])[None])
        if position_ids is None:
            starts = (cu_seqlens_padded if cu_seqlens_padded is not None else cu_seqlens)
            if starts is not None:
                starts = starts.to(device)[:-1]
                position_ids = (torch.arange(seq_len, device=device) - starts[layout_idx[0].long()])[None]
    elif seq_idx is not None:
        # BSHD rows that each hold several documents: the same resets and mask as THD, any batch size.
        documents.append(_check_ids_2d(seq_idx, "seq_idx", batch_size, seq_len, device))
    if packed_seq_ids is not None:
        ids = _check_ids_2d(packed_seq_ids, "_packed_seq_ids", batch_size, seq_len, device)
        if bool((ids < 0).any()):
            raise InputError("_packed_seq_ids must be >= 0 (document ids 1, 2, ...; 0 = padding)")
        documents.append(ids)
        keeps.append(ids != 0)
    if documents:
        if past_len:
            raise InputError("packed documents (seq_idx / _packed_seq_ids) cannot continue from a cache")
        meta.seq_idx = document_runs(documents)
    for name, mask, is_padding in (("attention_mask", attention_mask, False), ("padding_mask", padding_mask, True)):
        if mask is None:
            continue
        if mask.dim() != 2 or mask.shape[0] != batch_size or mask.shape[1] not in (seq_len, past_len + seq_len):
            raise InputError(
                f"{name} must be 2-D [batch, seq] matching the input {batch_size}x{seq_len}"
                f"{f' (+{past_len} cached)' if past_len else ''}, got {tuple(mask.shape)} "
                f"(attention_mask: 1 = token; padding_mask: True = padding)"
            )
        mask = mask.to(device=device).bool()
        keeps.append(~mask if is_padding else mask)  # the public padding_mask is True on padding
    if keeps:
        kv_len = past_len + seq_len
        # A [B, S] mask covers the new tokens only: the cached ones are real.
        full = [k if k.shape[1] == kv_len else torch.cat([k.new_ones(batch_size, past_len), k], dim=1) for k in keeps]
        mask2d = full[0]
        for k in full[1:]:
            mask2d = mask2d & k
        if not bool(mask2d.all()):
            meta.kv_padding_mask = mask2d
            meta.padding_mask = mask2d[:, -seq_len:]
    if causal_mask is not None:
        meta._attn_mask = caller_attn_mask(causal_mask, batch_size, seq_len, past_len, num_heads, device)
        meta._attn_mask_built = meta.attn_mask_from_caller = True
    if position_ids is None:
        position_ids = torch.arange(past_len, past_len + seq_len, device=device)[None].expand(batch_size, -1)
    meta.position_ids = position_ids
    return meta


def _check_ids_2d(ids: torch.Tensor, name: str, batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """``ids`` as an int64 ``[B, S]`` tensor on ``device``, or an InputError naming ``name``."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or tuple(ids.shape) != (batch_size, seq_len):
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise InputError(f"{name} must be [batch, seq] = [{batch_size}, {seq_len}] like the input, got {shape}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InputError(f"{name} must hold integer document ids, got {ids.dtype}")
    return ids.to(device=device, dtype=torch.int64)


def document_runs(documents: list[torch.Tensor]) -> torch.Tensor:
    """``[B, S]`` int32 run index: 0 at each row's start, +1 wherever any of ``documents`` changes value.

    A contiguous run of equal ids is one document, so two runs never share an index: the Mamba scan
    and conv kernels treat equal ``seq_idx`` values as one document (they are built for increasing
    ids), and the attention mask compares them for equality."""
    change = torch.zeros(documents[0].shape, dtype=torch.bool, device=documents[0].device)
    for ids in documents:
        change[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    return change.cumsum(1, dtype=torch.int32)


def caller_attn_mask(mask: torch.Tensor, batch_size: int, seq_len: int, past_len: int,
                     num_heads: int | None, device: torch.device) -> torch.Tensor:
    """The attention mask for ``causal_mask_mapping["full_attention"]``, in the form attention takes.

    Accepted as SDPA accepts it: ``[B or 1, 1 or heads, S, past + S]``, boolean (True = may attend) or
    floating additive (added to the scores: 0 = attend, -inf or a large negative value such as
    ``finfo.min``, which transformers and NeMo AutoModel use, = blocked). It replaces the mask the
    attention layers would build (causal, padding and documents included), as in the reference; the
    Mamba layers and the loss still take their padding from the 2D masks.

    A 0 / blocked float mask (the usual case) becomes boolean, so that it takes every attention
    implementation and query rows that see nothing see themselves (``see_self_if_blind``) as for our own
    masks; any other float values (a bias) stay additive, in SDPA."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"causal_mask_mapping['full_attention'] must be a 4-D mask [batch, heads, q, kv], got {shape}")
    b, h, q, kv = mask.shape
    heads_ok = num_heads is None or h in (1, num_heads)
    if b not in (1, batch_size) or not heads_ok or (q, kv) != (seq_len, past_len + seq_len):
        want_h = "1" if num_heads is None else f"1 or {num_heads}"
        raise InputError(f"causal_mask_mapping['full_attention'] must be [{batch_size} or 1, {want_h}, "
                         f"{seq_len}, {past_len + seq_len}] (batch, heads, queries, keys incl. cached), "
                         f"got {tuple(mask.shape)}")
    mask = mask.to(device)
    if mask.is_floating_point():
        blocked = mask <= torch.finfo(mask.dtype).min / 2  # -inf, finfo.min and the like
        if not bool((blocked | (mask == 0)).all()):
            return mask
        mask = ~blocked
    elif mask.dtype != torch.bool:
        raise InputError(f"causal_mask_mapping['full_attention'] must be bool or floating (additive), got {mask.dtype}")
    return see_self_if_blind(mask, past_len)
