"""The MoE router's logits, ``x @ W^T`` with bf16 ``x`` and an fp32 ``W``, on tensor cores, as
accurate as an IEEE fp32 GEMM.

transformers computes the router in fp32 (``F.linear(x.float(), W.float())``), and the expert choice
is a top-k over those logits, so a near-tie decides differently if the logits are rounded
differently. cuBLAS's fp32 GEMM is exact IEEE arithmetic but slow (at an 8,192-token prefill of
the Nano model, 0.19 ms per layer plus a cast of x to fp32). Here each fp32 weight is cut, inside
the kernel, into three bf16 parts that sum to it exactly (``hi = bf16(w)``, ``mid = bf16(w - hi)``,
``lo = w - hi - mid``); x is bf16 already, so each part's products are exact on the tensor cores.
What is not IEEE is the tensor cores' accumulation within one MMA chain, so each 64-wide K chunk
gets fresh accumulators and the chunks are summed in IEEE fp32, compensated (Kahan). Measured on
the H200 against an fp64 reference (``benchmarks/gpu_router_precision.py``, 8,192 tokens), the
scheme as separate torch GEMMs: relative error 2.7e-7, no changed expert choice, against 7.5e-7 and
one changed choice for cuBLAS's fp32 GEMM; without the chunks (one MMA chain over all of K) 3.4e-6.
This kernel: 3.8e-7 and one changed choice, 0.067 ms per call (5e-7 with a plain running sum).

Its time hardly depends on the row count below about 8,192 rows (each program runs the 42 chunks
one after another): 55 us per layer at 128 rows, 67 us at 8,192 on the H200, against 0.19 ms for
cuBLAS's fp32 GEMM and cast at 8,192 rows, which scale with the rows. So it serves long prefills
(``MIN_ROWS``), cuBLAS the rows between. A decode step (fewer than ``DECODE_ROWS``) takes
``router_partials``: fp32 products and sums on the CUDA cores over slices of K, all loads of a
program issued at once, and the route kernel adds the slices. That replaced cuBLAS's GEMV, its
reduction kernel and the cast of x to fp32: 10.8 us of kernels a layer became 5.2 us at batch 1.

The kernels also run under Triton's interpreter (CPU tests).
"""
from __future__ import annotations

import functools

import torch

from . import triton_moe
from .triton_moe import _next_pow2, interpreting, pdl_launch, usable

# router_logits from this many rows, router_partials below DECODE_ROWS, cuBLAS between (see above).
MIN_ROWS = 2048
DECODE_ROWS = triton_moe.DECODE_ROWS
# K chunk whose products the tensor cores sum before IEEE fp32 takes over (see the module docstring).
CHUNK_K = 64
# (BLOCK_M, BLOCK_N, warps) the autotuner picks from, per bucket of the row count.
_CONFIGS = ((64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 8))
INTERPRETER_CONFIG = 0


# router_partials: K slice per program (one straight load, no loop) and experts per program.
SLICE_K, SLICE_E = 256, 8


@functools.lru_cache(maxsize=None)
def _partials_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def router_partials(x_ptr, w_ptr, out_ptr, g_ptr, xn_ptr, M, E, K: tl.constexpr, stride_xm, stride_we,
                        stride_op, stride_om, stride_nm, eps, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_K: tl.constexpr, NORM: tl.constexpr, ROW_K: tl.constexpr, TRIGGER: tl.constexpr):
        # K is a constexpr (one compile per hidden size): the norm's loop over K is unrolled.
        if TRIGGER:  # the route kernel may start now (it waits for this one before reading)
            gdc_launch_dependents()
        # Program (expert block, K slice, row block) writes partial sum number "slice" of its logits.
        k_slice = tl.program_id(1)
        offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_k = k_slice * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_mk = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        # The weights first: their loads do not wait for the norm below.
        w = tl.load(w_ptr + offs_e[:, None] * stride_we + offs_k[None, :],
                    mask=(offs_e[:, None] < E) & (offs_k[None, :] < K), other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_mk, other=0.0)
        if NORM:
            # The block's RMSNorm, folded in: each program reads its rows whole (a few KB, from L2)
            # for their mean square (unrolled: all loads in flight at once), and normalises its
            # slice exactly as the norm kernel does (x * rstd * g in fp32, rounded to x's dtype). The
            # first expert block's programs store the normalised rows for the expert GEMVs.
            squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in tl.static_range(0, K, ROW_K):
                offs_r = k0 + tl.arange(0, ROW_K)
                row = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_r[None, :],
                              mask=(offs_m[:, None] < M) & (offs_r[None, :] < K), other=0.0).to(tl.float32)
                squares += tl.sum(row * row, axis=1)
            rstd = 1 / tl.sqrt(squares / K + eps)
            g = tl.load(g_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * rstd[:, None] * g[None, :]).to(xn_ptr.dtype.element_ty)
            if tl.program_id(0) == 0:
                tl.store(xn_ptr + offs_m[:, None] * stride_nm + offs_k[None, :], x, mask=mask_mk)
        x = x.to(tl.float32)
        part = tl.sum(x[:, None, :] * w[None, :, :], axis=2)  # [BLOCK_M, BLOCK_E], a tree sum over the slice
        tl.store(out_ptr + k_slice * stride_op + offs_m[:, None] * stride_om + offs_e[None, :], part,
                 mask=(offs_m[:, None] < M) & (offs_e[None, :] < E))

    from triton.language.extra.cuda import gdc_launch_dependents

    globals().update(gdc_launch_dependents=gdc_launch_dependents)  # (the interpreter's names)
    return router_partials, triton.cdiv


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl
    import triton.testing

    @triton.jit
    def router_logits(x_ptr, w_ptr, out_ptr, M, E, K: tl.constexpr, M_BUCKET, stride_xm, stride_we, stride_om,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
        # M_BUCKET (the row count rounded up to a power of two, at most 1024) is only the autotune
        # key: keying on M itself would search again for every new prompt length.
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        comp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * stride_we + offs_k[None, :],
                        mask=(offs_n[:, None] < E) & (offs_k[None, :] < K), other=0.0)
            hi = w.to(tl.bfloat16)
            rest = w - hi.to(tl.float32)  # exact: hi holds w's leading bits
            mid = rest.to(tl.bfloat16)
            lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)  # what is left fits bf16 exactly
            if INTERPRET:  # the interpreter's bf16 tl.dot is wrong; fp32 holds these values exactly
                x, hi, mid, lo = x.to(tl.float32), hi.to(tl.float32), mid.to(tl.float32), lo.to(tl.float32)
            # Fresh accumulators per chunk and part, summed in IEEE fp32 (the order of the
            # reference measurement: (hi + mid) + lo, then onto the running total).
            part = tl.dot(x, tl.trans(hi), input_precision=PRECISION) + tl.dot(x, tl.trans(mid), input_precision=PRECISION)
            part = part + tl.dot(x, tl.trans(lo), input_precision=PRECISION)
            # Compensated (Kahan) sum over the K / 64 chunks: a plain running sum made the error of
            # those additions dominate (5e-7 relative on the H200, against 1e-7 for cuBLAS's GEMV).
            y = part - comp
            t = total + y
            comp = (t - total) - y
            total = t
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], total,
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < E))

    configs = (_CONFIGS[INTERPRETER_CONFIG],) if interpreting() else _CONFIGS
    tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": CHUNK_K}, num_warps=w)
                 for bm, bn, w in configs],
        key=["M_BUCKET", "E", "K"],
        cache_results=True,
        do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles),
    )(router_logits)
    return tuned, triton.cdiv


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``router_logits`` takes ``x [N, K]`` against ``weight [E, K]``: bf16 x (exact as a
    tensor-core input), fp32 weight, contiguous rows, CUDA (or the interpreter)."""
    return (x.dim() == 2 and x.dtype == torch.bfloat16 and weight.dtype == torch.float32
            and x.stride(-1) == 1 and weight.stride(-1) == 1 and usable(x))


def _require_supported(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if not supported(x, weight):
        raise ValueError(f"{name} takes bf16 x and an fp32 weight with contiguous rows "
                         f"(got {x.dtype} {tuple(x.shape)}, {weight.dtype} {tuple(weight.shape)})")


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x.float() @ weight.T`` in fp32 (``[N, E]``), from bf16 ``x [N, K]`` and fp32 ``weight [E, K]``."""
    _require_supported("router_logits", x, weight)
    n, k = x.shape
    e = weight.shape[0]
    out = torch.empty(n, e, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    kernel, cdiv = _kernel()
    grid = lambda meta: (cdiv(n, meta["BLOCK_M"]), cdiv(e, meta["BLOCK_N"]))  # noqa: E731
    interpret = interpreting()
    kernel[grid](x, weight, out, n, e, k, min(_next_pow2(n), 1024), x.stride(0), weight.stride(0), out.stride(0),
                 INTERPRET=interpret, PRECISION="ieee" if interpret else None)
    return out


def router_partials(x: torch.Tensor, weight: torch.Tensor,
                    norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x.float() @ weight.T`` as partial sums over slices of K, ``[ceil(K / SLICE_K), N, E]`` fp32, for
    ``triton_moe.route_triton`` to add up; for a few rows (a decode step) with ``supported`` inputs.

    With ``norm = (g, eps)`` the logits are those of ``rms_norm(x, g, eps)`` (rounded to x's dtype, as
    the norm would return it), and the normalised rows come back too: (partials, normalised x). That
    saves the block's norm kernel at decode."""
    _require_supported("router_partials", x, weight)
    n, k = x.shape
    e = weight.shape[0]
    kernel, cdiv = _partials_kernel()
    slices = cdiv(k, SLICE_K)
    out = torch.empty(slices, n, e, dtype=torch.float32, device=x.device)
    xn = torch.empty_like(x) if norm is not None else None
    if n > 0:
        g, eps = norm if norm is not None else (weight, 0.0)  # (g never read without NORM)
        if norm is not None and (g.shape != (k,) or g.stride(0) != 1):
            raise ValueError(f"the norm weight must be contiguous [{k}], got {tuple(g.shape)}")
        block_m = min(_next_pow2(n), 8)
        kernel[(cdiv(e, SLICE_E), slices, cdiv(n, block_m))](
            x, weight, out, g, xn if xn is not None else x, n, e, k, x.stride(0), weight.stride(0), out.stride(0),
            out.stride(1), xn.stride(0) if xn is not None else 0, float(eps),
            BLOCK_M=block_m, BLOCK_E=SLICE_E, BLOCK_K=SLICE_K, NORM=norm is not None, ROW_K=1024 // block_m,
            TRIGGER=triton_moe.ROUTE_PDL and pdl_launch(x),
            num_warps=8 if block_m >= 8 else 4)
    return out if norm is None else (out, xn)
