"""``relu2(x) = relu(x) ** 2`` as one Triton kernel forward and one backward.

Why: relu2 is the activation of every MLP and expert of Nemotron-H. In torch it is two elementwise
kernels forward (relu, square) and about three backward, each a full pass over a large bf16 tensor
(``[49152, 1856]`` per MoE layer at an 8192-token prefill of the 30B model, ``[4096, 12288]`` per
MLP layer in training). The op is pure memory traffic, so one pass is the whole cost: read x, write y
(forward); read x and dy, write dx (backward).

Numerics: both kernels compute in fp32 and round once to ``x.dtype``, which is what torch does too:
``relu`` is exact, and torch's ``square`` (in bf16/fp16) upcasts, multiplies in fp32 and rounds once.
Torch's backward is ``dy * (2 * r)`` (``2 * r`` is exact, one rounding for the product) zeroed where
``r <= 0``; the kernel evaluates the same expression in the same order. So results are bit-equal to
``F.relu(x).square()`` and to its autograd, NaN propagation included. The one known exception is the
fp16 backward at x >= 2**15: torch's fp16 ``2 * r`` overflows to inf there, so its dx is +-inf even
where ``2 * r * dy`` fits in fp16 (|dy| < 1); the kernel gives that product, correctly rounded.

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

# Elements per program, and warps. 2048 elements over 4 warps is 16 per thread: two 16-byte vector
# accesses per tensor for bf16, four for fp32, enough bytes in flight per thread for a streaming
# kernel; 1-D grids of that size are standard for elementwise Triton kernels. Not swept on an H200.
_BLOCK = 2048
_NUM_WARPS = 4


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    _widen, _round = triton_bf16.helpers()  # exact bf16 conversions, also in the interpreter

    @triton.jit
    def relu2_fwd(x_ptr, y_ptr, n, BLOCK: tl.constexpr, BF16_BY_BITS: tl.constexpr):
        # int64 offsets: the flattened tensor may hold more than 2**31 elements.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = _widen(tl.load(x_ptr + offs, mask=mask, other=0.0), BF16_BY_BITS)
        # where(x < 0) rather than tl.maximum: NaN stays NaN, as in torch's relu.
        r = tl.where(x < 0.0, 0.0, x)
        tl.store(y_ptr + offs, _round(r * r, y_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask)

    @triton.jit
    def relu2_bwd(x_ptr, dy_ptr, dx_ptr, n, BLOCK: tl.constexpr, BF16_BY_BITS: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = _widen(tl.load(x_ptr + offs, mask=mask, other=0.0), BF16_BY_BITS)
        dy = _widen(tl.load(dy_ptr + offs, mask=mask, other=0.0), BF16_BY_BITS)
        # torch's order: (2 * r) * dy, then zero where r <= 0 (so an inf/NaN dy at x <= 0 gives 0,
        # and a NaN x gives NaN).
        dx = tl.where(x <= 0.0, 0.0, (2.0 * x) * dy)
        tl.store(dx_ptr + offs, _round(dx, dx_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask)

    # Compiled Triton finds the helpers through the closure; the interpreter resolves names through
    # the module's globals only (see triton_conv), so publish them there.
    globals().update(tl=tl, _widen=_widen, _round=_round)
    return relu2_fwd, relu2_bwd, triton.cdiv


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` laid out densely in row-major order (the kernels index it as one flat array)."""
    return t if t.is_contiguous() else t.contiguous()


def _forward(x: torch.Tensor) -> torch.Tensor:
    x = _flat(x)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    if n == 0:
        return y
    fwd, _, cdiv = _kernels()
    fwd[(cdiv(n, _BLOCK),)](x, y, n, BLOCK=_BLOCK, BF16_BY_BITS=triton_bf16.by_bits(x), num_warps=_NUM_WARPS)
    return y


def _backward(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    # x was made contiguous by the forward; dy often is not (e.g. the expanded ones of a .sum()).
    dy = _flat(dy)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    if n == 0:
        return dx
    _, bwd, cdiv = _kernels()
    bwd[(cdiv(n, _BLOCK),)](x, dy, dx, n, BLOCK=_BLOCK, BF16_BY_BITS=triton_bf16.by_bits(x), num_warps=_NUM_WARPS)
    return dx


class _Relu2(torch.autograd.Function):
    """Saves only x (the same memory as torch's saved ``relu(x)``); dx is recomputed from it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = _flat(x)
        ctx.save_for_backward(x)
        return _forward(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _backward(x, dy)


def relu2_triton(x: torch.Tensor) -> torch.Tensor:
    """``relu(x) ** 2`` in one kernel: a new contiguous tensor of x's shape and dtype.

    Computed in fp32 and rounded once, bit-equal to ``F.relu(x).square()``. A non-contiguous x is
    copied first. Differentiable (one backward kernel, ``dx = 2 * relu(x) * dy``, also bit-equal to
    torch's); the autograd wrapper is used only when a gradient is needed.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _Relu2.apply(x)
    return _forward(x)


def supported(x: torch.Tensor) -> bool:
    """Whether ``relu2_triton`` can take x: a float32/16 or bfloat16 tensor, on CUDA with triton
    installed, or on CPU under Triton's interpreter."""
    if x.dtype not in _DTYPES or x.device.type not in ("cuda", "cpu"):
        return False
    return usable(x)
