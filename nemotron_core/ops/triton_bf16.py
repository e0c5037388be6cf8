"""Exact bf16 <-> fp32 conversions for Triton kernels that also run in Triton's CPU interpreter.

The interpreter (how the CPU tests check our kernels) converts bf16 wrongly: it flushes bf16
subnormals to zero when widening and truncates instead of rounding to nearest even when narrowing.
A GPU's ``.to`` does both exactly, as torch does. Kernels call ``widen``/``narrow`` with the constexpr
``BF16_BY_BITS = by_bits(tensor)``: true only for bf16 under the interpreter, where the helpers work
on the bit patterns, so the tests see what a GPU computes; compiled code keeps the plain ``.to``.

Built on first use (importing this module does not need triton). A kernel module publishes the
helpers in its own globals as well: the interpreter resolves a kernel's names there only.
"""
from __future__ import annotations

import functools

import torch

from .triton_moe import interpreting


def by_bits(t: torch.Tensor) -> bool:
    """Whether kernels must convert ``t``'s bf16 values by hand (bf16 under the interpreter)."""
    return t.dtype == torch.bfloat16 and interpreting()


@functools.lru_cache(maxsize=None)
def helpers():
    """``(widen, narrow)``: ``widen(v, BF16_BY_BITS)`` -> fp32 (exact); ``narrow(v, out_ty,
    BF16_BY_BITS)`` -> fp32 ``v`` rounded to nearest even in ``out_ty``."""
    import triton
    import triton.language as tl

    @triton.jit
    def widen(v, BF16_BY_BITS: tl.constexpr):
        if BF16_BY_BITS:
            # A bf16 is the upper half of an fp32 with the same value.
            return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            return v.to(tl.float32)

    @triton.jit
    def narrow(v, out_ty: tl.constexpr, BF16_BY_BITS: tl.constexpr):
        if BF16_BY_BITS:
            # Round to nearest even on the bits: add 0x7FFF plus the lowest kept bit, keep the top 16.
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            bits = tl.where(v != v, 0x7FC00000, bits)  # a NaN's payload could carry into an inf
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return v.to(out_ty)

    globals().update(tl=tl)  # for the interpreter (see the module docstring)
    return widen, narrow
