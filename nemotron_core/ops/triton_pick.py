"""A decode loop's work between two steps, as two small Triton kernels: the greedy pick and the
bookkeeping.

Between two decode steps ``generate`` picks each row's next token and records it: a row already
finished gets padding instead, the token goes into the output at the step's index and into the next
step's input, and an EOS finishes its row. As torch ops that is a dozen launches of a few
microseconds each outside the step's CUDA graph: 53 us a step on the H200 at batch 1, 2.3% of a
Nano step (``benchmarks/gpu_step_gap.py``). Here it is:

* ``argmax_partials``: each program finds the largest logit of one block of a row (the first one on
  ties, the first NaN if there is one, as ``torch.argmax`` does);
* ``advance``: one program reduces those partials to each row's token, or takes tokens picked
  elsewhere (sampled), and does the bookkeeping, reading the step's index on the device. A row whose
  largest logit is NaN or infinite stops there, its index recorded: greedy decoding notices broken
  logits without a host sync per token (``generate`` reads the record once, at the end).

Both touch only device buffers, so the greedy pick and the bookkeeping are captured in the decode
step's graph (``generation.Decoder``): the host replays one graph per token and launches nothing
else. ``advance_reference`` is the plain-PyTorch definition (and the path without Triton).
"""
from __future__ import annotations

import functools

import torch

from . import triton_bf16
from .triton_moe import _next_pow2, usable

# Logits per argmax program: 32 programs a row for a 131,072-token vocabulary.
ARGMAX_BLOCK = 4096


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    widen, _ = triton_bf16.helpers()

    @triton.jit
    def _first_max(vals, idxs, AXIS: tl.constexpr):
        """(value, index) of the maximum of ``vals`` along AXIS as ``torch.argmax`` picks it: the
        smallest index among the maxima, or the first NaN if there is one. ``idxs``: each value's
        index (BIG where it must not win)."""
        BIG: tl.constexpr = 2147483647  # larger than any vocabulary index
        nan = vals != vals
        first_nan = tl.min(tl.where(nan, idxs, BIG), axis=AXIS)
        m = tl.max(tl.where(nan, float("-inf"), vals), axis=AXIS)
        first_max = tl.min(tl.where(vals == tl.expand_dims(m, AXIS), idxs, BIG), axis=AXIS)
        has_nan = first_nan < BIG
        return tl.where(has_nan, float("nan"), m), tl.where(has_nan, first_nan, first_max)

    @triton.jit
    def argmax_partials(logits_ptr, val_ptr, idx_ptr, V, stride_l, NB, BLOCK: tl.constexpr,
                        BF16_BY_BITS: tl.constexpr):
        """(value, index) of block j of row b's maximum: the first maximum, or the first NaN."""
        b = tl.program_id(0)
        j = tl.program_id(1)
        offs = j * BLOCK + tl.arange(0, BLOCK)
        valid = offs < V
        v = widen(tl.load(logits_ptr + b.to(tl.int64) * stride_l + offs, mask=valid), BF16_BY_BITS)
        # (The masked tail is -inf at indices past every valid one, so it never wins a tie.)
        m, at = _first_max(tl.where(valid, v, float("-inf")), offs, 0)
        tl.store(val_ptr + b * NB + j, m)
        tl.store(idx_ptr + b * NB + j, at)

    @triton.jit
    def advance(val_ptr, idx_ptr, picked_ptr, out_ptr, index_ptr, tokens_ptr, done_ptr, hit_ptr, eos_ptr,
                pad_ptr, seen_ptr, bad_ptr, B, NB, NE, stride_ob, stride_tb, stride_sb, BLOCK_B: tl.constexpr,
                NB_P2: tl.constexpr, NE_P2: tl.constexpr, FROM_LOGITS: tl.constexpr, HAS_SEEN: tl.constexpr,
                HAS_BAD: tl.constexpr):
        BIG: tl.constexpr = 2147483647
        rows = tl.arange(0, BLOCK_B)
        live = rows < B
        done = tl.load(done_ptr + rows, mask=live, other=0) != 0
        i = tl.load(index_ptr)
        if FROM_LOGITS:
            # Blocks come in index order and each holds its first maximum: the smallest index among
            # the blocks that reach the row's maximum is the row's first maximum.
            cols = tl.arange(0, NB_P2)
            at = rows[:, None] * NB + cols[None, :]
            m2 = live[:, None] & (cols[None, :] < NB)
            vals = tl.load(val_ptr + at, mask=m2, other=float("-inf"))
            idxs = tl.load(idx_ptr + at, mask=m2, other=BIG)
            best, picked = _first_max(vals, idxs, 1)
            picked = picked.to(tl.int64)
            if HAS_BAD:
                # A live row whose largest logit is NaN or infinite is done from here (this token is
                # padding); the first such index is recorded for the caller.
                broken = live & ~done & ((best != best) | (tl.abs(best) == float("inf")))
                bad = tl.load(bad_ptr + rows, mask=live, other=-1)
                tl.store(bad_ptr + rows, tl.where(broken & (bad < 0), i, bad), mask=live)
                done = done | broken
        else:
            picked = tl.load(picked_ptr + rows, mask=live, other=0).to(tl.int64)
        tok = tl.where(done, tl.load(pad_ptr), picked)
        tl.store(out_ptr + rows.to(tl.int64) * stride_ob + i, tok, mask=live)
        if HAS_SEEN:  # (repetition penalty) a live row has now seen its token
            tl.store(seen_ptr + rows.to(tl.int64) * stride_sb + tok, live, mask=live & ~done)
        ne = tl.arange(0, NE_P2)
        eos = tl.load(eos_ptr + ne, mask=ne < NE, other=-1)
        is_eos = (tl.sum((tok[:, None] == eos[None, :]).to(tl.int32), axis=1) > 0) & ~done
        hit = tl.load(hit_ptr + rows, mask=live, other=0) != 0
        tl.store(hit_ptr + rows, hit | is_eos, mask=live)
        tl.store(done_ptr + rows, done | is_eos, mask=live)
        tl.store(tokens_ptr + rows * stride_tb, tok, mask=live)
        tl.store(index_ptr, i + 1)

    globals().update(tl=tl, widen=widen, _first_max=_first_max)  # (the interpreter resolves names here)
    return argmax_partials, advance, triton.cdiv


def mark_broken(logits: torch.Tensor, done: torch.Tensor, bad_at: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A live row (not ``done``) whose largest logit is NaN or infinite is ``done`` from here, and ``bad_at``
    takes ``index`` for it unless it holds one (>= 0) already; in place, no host sync. Returns which rows'
    logits are finite (``[B]`` bool). The torch form of what ``advance`` checks on the argmax."""
    finite = torch.isfinite(logits.max(-1).values)
    broken = ~finite & ~done
    bad_at.copy_(torch.where(broken & (bad_at < 0), index, bad_at))
    done |= broken
    return finite


def advance_reference(out: torch.Tensor, index: torch.Tensor, tokens: torch.Tensor, done: torch.Tensor,
                      hit_eos: torch.Tensor, eos: torch.Tensor, pad: torch.Tensor, picked: torch.Tensor | None = None,
                      logits: torch.Tensor | None = None, seen: torch.Tensor | None = None,
                      bad_at: torch.Tensor | None = None) -> None:
    """What ``advance`` does, in torch ops. Row b's token is ``picked[b]`` (or ``logits[b].argmax()``),
    ``pad`` where ``done[b]``; it goes to ``out[b, index]`` and ``tokens[b]``, and into ``seen`` where the row
    is live; a live row whose token is in ``eos`` gets ``hit_eos`` and ``done``; ``index`` goes up by one.
    With ``logits`` and ``bad_at``: a live row whose largest logit is NaN or infinite is done first (its
    token is ``pad``), and ``bad_at[b]`` gets ``index`` unless it was set (>= 0) already."""
    if picked is None:
        picked = logits.argmax(-1)
        if bad_at is not None:
            mark_broken(logits, done, bad_at, index)
    tok = torch.where(done, pad, picked)
    out.index_copy_(1, index, tok[:, None])
    if seen is not None:
        seen.scatter_(1, tok[:, None], seen.gather(1, tok[:, None]) | ~done[:, None])
    is_eos = torch.isin(tok, eos) & ~done
    hit_eos |= is_eos
    done |= is_eos
    tokens.copy_(tok.view_as(tokens))
    index.add_(1)


def advance(out: torch.Tensor, index: torch.Tensor, tokens: torch.Tensor, done: torch.Tensor,
            hit_eos: torch.Tensor, eos: torch.Tensor, pad: torch.Tensor, picked: torch.Tensor | None = None,
            logits: torch.Tensor | None = None, seen: torch.Tensor | None = None,
            bad_at: torch.Tensor | None = None) -> None:
    """``advance_reference`` in at most two launches and no host sync (capturable); the reference where
    the kernels cannot run. Buffers: ``out [B, T]``, ``tokens [B, 1]`` int64; ``index``, ``pad`` one-element
    int64; ``done``, ``hit_eos [B]`` and ``seen [B, V]`` bool; ``eos [E]`` int64 (-1 never matches);
    ``logits [B, V]`` (any float dtype; the largest logit wins, the first on ties, as in argmax);
    ``bad_at [B]`` int64 (-1 while a row's logits are finite)."""
    if (picked is None) == (logits is None):
        raise ValueError("give either picked tokens or logits")
    if not usable(out) or (logits is not None and logits.stride(-1) != 1):
        advance_reference(out, index, tokens, done, hit_eos, eos, pad, picked, logits, seen, bad_at)
        return
    argmax_partials, advance_kernel, cdiv = _kernels()
    bsz = out.shape[0]
    if logits is not None:
        vocab = logits.shape[-1]
        block = min(ARGMAX_BLOCK, _next_pow2(vocab))
        nb = cdiv(vocab, block)
        vals = torch.empty(bsz, nb, dtype=torch.float32, device=out.device)
        idxs = torch.empty(bsz, nb, dtype=torch.int32, device=out.device)
        argmax_partials[(bsz, nb)](logits, vals, idxs, vocab, logits.stride(0), nb, BLOCK=block,
                                   BF16_BY_BITS=triton_bf16.by_bits(logits), num_warps=4)
    else:
        picked = picked.contiguous()
        nb, vals, idxs = 1, picked, picked  # (unread)
    advance_kernel[(1,)](vals, idxs, picked if picked is not None else index, out, index, tokens, done, hit_eos, eos,
                         pad, seen if seen is not None else done, bad_at if bad_at is not None else index, bsz, nb,
                         eos.numel(), out.stride(0), tokens.stride(0), seen.stride(0) if seen is not None else 0,
                         BLOCK_B=_next_pow2(bsz), NB_P2=_next_pow2(nb), NE_P2=_next_pow2(eos.numel()),
                         FROM_LOGITS=logits is not None, HAS_SEEN=seen is not None,
                         HAS_BAD=logits is not None and bad_at is not None, num_warps=1 if bsz * nb <= 256 else 4)
