"""Pack several token sequences into one THD batch, and split per-token outputs back.

A packed batch is one row ``[1, T]`` holding the documents back to back, described by
``cu_seqlens`` (document starts, int32 ``[N + 1]``). With ``pad_to_multiple_of`` each document is
followed by padding up to the next multiple (as Transformer Engine's THD path and context
parallelism want); ``cu_seqlens_padded`` then gives the padded starts while ``cu_seqlens`` keeps the
true lengths, and the model treats the gap as padding (ignored by every mixer and by the loss).

    batch = pack_sequences([[5, 6, 7], [8, 9]])
    out = model(**batch.as_kwargs())                 # logits [1, T, V]; loss from batch.labels
    per_doc = unpack(out.logits, batch)              # [[3, V], [2, V]]
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """One THD batch.

    Attributes:
        input_ids: ``[1, T]`` token ids, documents back to back (padding holds ``pad_id``).
        cu_seqlens: int32 ``[N + 1]``; document ``i`` has ``cu_seqlens[i+1] - cu_seqlens[i]`` real tokens.
        cu_seqlens_padded: int32 ``[N + 1]`` padded document starts, or None when nothing was padded
            (then ``cu_seqlens`` are also the starts).
        max_seqlen: the longest (padded) document.
        position_ids: ``[1, T]`` position within the document, restarting at 0 for each one.
        labels: ``[1, T]`` the input ids with ``-100`` on padding (the model shifts them itself).
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_padded: torch.Tensor | None
    max_seqlen: int
    position_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def lengths(self) -> list[int]:
        """True (unpadded) length of each document."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    @property
    def starts(self) -> list[int]:
        """Where each document starts in the packed row."""
        layout = self.cu_seqlens_padded if self.cu_seqlens_padded is not None else self.cu_seqlens
        return layout[:-1].tolist()

    @property
    def padding_mask(self) -> torch.Tensor:
        """``[1, T]`` bool, True on real tokens.

        Beware: the opposite polarity of ``forward(padding_mask=...)`` (True = padding, as in NeMo
        AutoModel); pass ``~batch.padding_mask`` there, or this as ``attention_mask``."""
        mask = torch.zeros_like(self.input_ids, dtype=torch.bool)
        for s, n in zip(self.starts, self.lengths):
            mask[:, s : s + n] = True
        return mask

    @property
    def packed_seq_ids(self) -> torch.Tensor:
        """``[1, T]`` int64, NeMo AutoModel's packed-row ids: document ``i`` (from 1) on its real tokens,
        0 on padding. ``forward(input_ids=batch.input_ids, _packed_seq_ids=batch.packed_seq_ids)`` is the
        BSHD equivalent of ``forward(**batch.as_kwargs())``."""
        ids = torch.zeros_like(self.input_ids)
        for i, (s, n) in enumerate(zip(self.starts, self.lengths), 1):
            ids[:, s : s + n] = i
        return ids

    def as_kwargs(self, with_labels: bool = True) -> dict[str, Any]:
        """Keyword arguments for ``NemotronHForCausalLM.forward`` (``qkv_format="thd"`` and the layout)."""
        kwargs: dict[str, Any] = {
            "input_ids": self.input_ids,
            "qkv_format": "thd",
            "cu_seqlens": self.cu_seqlens,
            "max_seqlen": self.max_seqlen,
            "position_ids": self.position_ids,
        }
        if self.cu_seqlens_padded is not None:
            kwargs["cu_seqlens_padded"] = self.cu_seqlens_padded
        if with_labels:
            kwargs["labels"] = self.labels
        return kwargs

    def to(self, device: torch.device | str) -> "PackedBatch":
        """A copy with every tensor on ``device``."""
        return PackedBatch(
            input_ids=self.input_ids.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
            cu_seqlens_padded=None if self.cu_seqlens_padded is None else self.cu_seqlens_padded.to(device),
            max_seqlen=self.max_seqlen,
            position_ids=self.position_ids.to(device),
            labels=self.labels.to(device),
        )


def _as_ids(seq: Sequence[int] | torch.Tensor, i: int) -> torch.Tensor:
    try:
        t = seq if isinstance(seq, torch.Tensor) else torch.tensor(list(seq), dtype=torch.long)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"sequence {i} must be a list of token ids or a 1-D tensor ({e})") from e
    if t.dim() != 1:
        raise InputError(f"sequence {i} must be 1-D token ids, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"sequence {i} must hold integer token ids, got {t.dtype}")
    if t.numel() == 0:
        raise InputError(f"sequence {i} is empty")
    return t.to(device="cpu", dtype=torch.long)


def pack_sequences(
    seqs: Sequence[Sequence[int] | torch.Tensor],
    pad_to_multiple_of: int | None = None,
    pad_id: int = 0,
) -> PackedBatch:
    """Pack token sequences into one THD batch.

    Args:
        seqs: the documents, each a list of ints or a 1-D integer tensor (non-empty).
        pad_to_multiple_of: when set (> 1), pad every document with ``pad_id`` up to a multiple of
            this; ``cu_seqlens_padded`` then records the padded layout. ``None`` or 1: no padding.
        pad_id: the token id written into padding (must be a valid id; it is never scored).

    Returns:
        A :class:`PackedBatch` on the CPU (``.to(device)`` moves it).
    """
    if len(seqs) == 0:
        raise InputError("pack_sequences needs at least one sequence")
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise InputError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
    ids = [_as_ids(s, i) for i, s in enumerate(seqs)]
    lengths = [t.numel() for t in ids]
    multiple = pad_to_multiple_of or 1
    padded = [-(-n // multiple) * multiple for n in lengths]
    use_padding = any(p != n for p, n in zip(padded, lengths))

    rows, labels, positions = [], [], []
    for t, n, p in zip(ids, lengths, padded):
        pad = t.new_full((p - n,), pad_id)
        rows.append(torch.cat([t, pad]))
        labels.append(torch.cat([t, t.new_full((p - n,), IGNORE_INDEX)]))
        positions.append(torch.arange(p))

    def cumulative(sizes: list[int]) -> torch.Tensor:
        return torch.tensor([0] + sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)

    return PackedBatch(
        input_ids=torch.cat(rows)[None],
        cu_seqlens=cumulative(lengths),  # true lengths, even when padded (Transformer Engine's convention)
        cu_seqlens_padded=cumulative(padded) if use_padding else None,
        max_seqlen=max(padded),
        position_ids=torch.cat(positions)[None],
        labels=torch.cat(labels)[None],
    )


def unpack(tensor: torch.Tensor, batch: PackedBatch) -> list[torch.Tensor]:
    """Split a per-token tensor of a packed batch back into one tensor per document.

    Args:
        tensor: ``[1, T, ...]`` or ``[T, ...]`` (e.g. logits, hidden states, per-token losses).
        batch: the :class:`PackedBatch` it was computed from.

    Returns:
        ``N`` tensors ``[len_i, ...]`` (views), padding dropped.
    """
    total = batch.input_ids.shape[-1]
    if tensor.dim() >= 2 and tensor.shape[0] == 1 and tensor.shape[1] == total:
        tensor = tensor[0]
    if tensor.dim() == 0 or tensor.shape[0] != total:
        raise InputError(f"unpack expects [1, {total}, ...] or [{total}, ...], got shape {tuple(tensor.shape)}")
    return [tensor[s : s + n] for s, n in zip(batch.starts, batch.lengths)]
