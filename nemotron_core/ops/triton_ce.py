"""Fused cross-entropy of a language model head: one Triton pass over the logits forward, one backward.

Why: the training loss is ``F.cross_entropy(logits.float(), targets, reduction="sum")`` over bf16
logits of ``[tokens, vocab]`` (``[4096, 131072]`` in a training step: 1 GB). Torch first makes an
fp32 copy (2 GB), keeps the fp32 log-softmax for the backward (2 GB more) and makes several full
passes over those tensors in each direction. Here:

* forward: each row is read once in its own dtype; a running max and sum of exponentials (fp32)
  give its logsumexp, and the target's logit is loaded on its own. Only ``lse`` (fp32, one per
  row) is saved, next to the logits themselves (no copy);
* backward: each row is read once more and ``g * (softmax - onehot)`` is written straight in the
  logits' dtype.

Numerics: everything is computed in fp32, as torch does after its ``.float()``; only the order of
the sums differs. The gradient is rounded once to the logits' dtype, as torch's ``.float()``
backward rounds its fp32 gradient once.

Targets outside ``[0, V)`` other than ``ignore_index`` are the caller's to reject (torch raises or
device-asserts on them). The kernels never read out of bounds for them; such a row gets a NaN loss
and a NaN gradient, so the mistake cannot pass silently.

Kernels are built on first use, so importing this module does not need triton. They also run on
CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests check them.
"""
from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from . import triton_bf16
from .triton_moe import usable

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Vocabulary entries per loop step, and warps per row. 4096 over 8 warps is 16 elements per thread:
# two 16-byte loads per step for bf16, enough bytes in flight for a streaming kernel, few registers.
# A 131072 vocabulary is 32 steps per row. Not swept on an H200. The tests lower BLOCK_V (it is a
# constexpr argument, read at each launch) so the interpreter runs several ragged steps on tiny rows.
# The vocabulary size V is a constexpr too: one compilation per vocabulary (a model has one), the
# loop's trip count and the ragged-tail masks are known to the compiler, and Triton's interpreter
# cannot loop up to a runtime scalar.
BLOCK_V = 4096
_NUM_WARPS = 8


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    _ce_widen, _ce_round = triton_bf16.helpers()  # exact bf16 conversions, also in the interpreter

    @triton.jit
    def ce_fwd(logits_ptr, targets_ptr, loss_ptr, lse_ptr, stride_row, ignore_index,
               V: tl.constexpr, BLOCK_V: tl.constexpr, BF16_BY_BITS: tl.constexpr):
        # One program per row. int64 row offset: R * V passes 2**31 (4096 x 131072 is 2**29, but
        # longer batches or a larger vocabulary do not fit int32).
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        target = tl.load(targets_ptr + row)
        active = target != ignore_index
        in_range = (target >= 0) & (target < V)
        cols = tl.arange(0, BLOCK_V)

        # Online logsumexp: m is the max so far, s the sum of exp(x - m). Each step rescales s to the
        # new max, so no exponent is ever positive and exp cannot overflow whatever the logits' scale.
        m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
        # An ignored row is not read at all (prompt tokens masked in fine-tuning can be most rows).
        if active:
            for start in range(0, V, BLOCK_V):
                mask = start + cols < V
                x = _ce_widen(tl.load(row_ptr + start + cols, mask=mask, other=0.0), BF16_BY_BITS)
                x = tl.where(mask, x, float("-inf"))
                m_new = tl.maximum(m, tl.max(x, axis=0))
                # The first step has m = -inf: exp(-inf) = 0 scales the empty sum (m_new is finite,
                # as every step holds at least one real column).
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
        # (log(1) on an ignored row, whose lse is never used: no log(0) warning in the interpreter.)
        lse = m + tl.log(tl.where(active, s, 1.0))

        # The target's logit, loaded alone; the mask keeps an out-of-range target from reading out
        # of bounds (its row's loss is NaN, see the module's docstring).
        safe = tl.where(active & in_range, target, 0)
        x_t = _ce_widen(tl.load(row_ptr + safe, mask=active & in_range, other=0.0), BF16_BY_BITS)
        x_t = tl.where(in_range, x_t, float("nan"))
        tl.store(loss_ptr + row, tl.where(active, lse - x_t, 0.0))
        tl.store(lse_ptr + row, tl.where(active, lse, 0.0))

    @triton.jit
    def ce_bwd(logits_ptr, targets_ptr, lse_ptr, grad_ptr, dlogits_ptr, stride_row, stride_drow, ignore_index,
               V: tl.constexpr, BLOCK_V: tl.constexpr, BF16_BY_BITS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        drow_ptr = dlogits_ptr + row * stride_drow
        target = tl.load(targets_ptr + row)
        active = target != ignore_index
        in_range = (target >= 0) & (target < V)
        lse = tl.load(lse_ptr + row)
        # The incoming gradient of the summed loss, read on the device (no host sync). A bad target
        # turns it into NaN for that row only.
        g = tl.load(grad_ptr)
        g = tl.where(in_range, g, float("nan"))
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            # An ignored row's loads are masked off (no memory traffic); it only writes zeros.
            x = _ce_widen(tl.load(row_ptr + offs, mask=mask & active, other=0.0), BF16_BY_BITS)
            p = tl.exp(x - lse)
            d = g * (p - tl.where(offs == target, 1.0, 0.0))
            # Exactly 0 on ignored rows, whatever g is (torch's gradient there is 0 even for inf g).
            d = tl.where(active, d, 0.0)
            tl.store(drow_ptr + offs, _ce_round(d, dlogits_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask)

    # Compiled Triton finds the helpers through the closure; the interpreter resolves names through
    # the module's globals only, so publish them there.
    globals().update(tl=tl, _ce_widen=_ce_widen, _ce_round=_ce_round)
    return ce_fwd, ce_bwd


def _forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (0 on ignored rows) and logsumexps, both fp32 [R]."""
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        fwd, _ = _kernels()
        fwd[(rows,)](logits, targets, losses, lse, logits.stride(0), ignore_index,
                     V=vocab, BLOCK_V=BLOCK_V, BF16_BY_BITS=triton_bf16.by_bits(logits), num_warps=_NUM_WARPS)
    return losses, lse


def _backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
              ignore_index: int) -> torch.Tensor:
    rows, vocab = logits.shape
    dlogits = torch.empty((rows, vocab), dtype=logits.dtype, device=logits.device)
    if rows:
        _, bwd = _kernels()
        g = grad.detach().to(torch.float32).reshape(1)
        bwd[(rows,)](logits, targets, lse, g, dlogits, logits.stride(0), dlogits.stride(0), ignore_index,
                     V=vocab, BLOCK_V=BLOCK_V, BF16_BY_BITS=triton_bf16.by_bits(logits), num_warps=_NUM_WARPS)
    return dlogits


class _CrossEntropySum(torch.autograd.Function):
    """Saves the logits (the caller's tensor, no copy), the targets and lse; nothing of size V."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        losses, lse = _forward(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        # Per-row losses summed by torch: deterministic, unlike atomics in the kernel, and tiny.
        return losses.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        dlogits = _backward(logits, targets, lse, grad, ctx.ignore_index) if ctx.needs_input_grad[0] else None
        return dlogits, None, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum over rows with ``targets[r] != ignore_index`` of ``logsumexp(logits[r]) - logits[r, targets[r]]``.

    ``logits`` is ``[R, V]`` fp32/fp16/bf16 with unit stride along V (see ``supported``); ``targets``
    is ``[R]`` integer ids in ``[0, V)`` or ``ignore_index`` (others give NaN; validate first). Returns
    an fp32 scalar, equal to ``F.cross_entropy(logits.float(), targets, ignore_index=ignore_index,
    reduction="sum")`` up to the order of fp32 sums. Differentiable w.r.t. the logits; the gradient
    comes in the logits' dtype.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_sum takes logits [R, V] and targets [R], got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    targets = targets.to(device=logits.device, dtype=torch.int64).contiguous()
    return _CrossEntropySum.apply(logits, targets, int(ignore_index))


def supported(logits: torch.Tensor) -> bool:
    """Whether ``cross_entropy_sum`` can take ``logits``: 2-D fp32/fp16/bf16 with unit stride along the
    vocabulary (any row stride), at least one column, on CUDA with triton or on CPU under the interpreter."""
    if logits.dim() != 2 or logits.dtype not in _DTYPES or logits.shape[1] == 0 or logits.stride(1) != 1:
        return False
    if logits.device.type not in ("cuda", "cpu"):
        return False
    return usable(logits)
