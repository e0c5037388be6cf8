"""Routed experts for a short prompt: one program per (expert, chunk of up to ``MG`` of its tokens,
block of output rows), reading that block of the expert's weights once per chunk.

A prompt of a few hundred tokens gives each of the 128 experts a handful of tokens (128 tokens x 6
experts: about 6 each), so the expert GEMMs are bound by reading every expert's weights once (1.28
GB per projection and layer on the Nano model). torch's grouped GEMM (CUTLASS) read them at about
3.2 TB/s on the H200; its tiles are sized for many rows per expert. Here a program loads one weight
tile per K step and multiplies it into its expert's tokens (gathered through the expert-sorted slot
order, ``MG`` at a time) on the tensor cores, as the decode GEMV's grouped tiles do for a few tokens
(``triton_experts``), writing each slot's row in slot order so that the combine needs no index.

Routing is rarely even: in a random Nano model the second MoE layer already gives its busiest expert
222 of a 1,024-token prompt's 6,144 slots (48 on average), and trained routers are uneven too. So
the chunks form a flat list of tiles rather than a loop inside one program per expert, whose
busiest expert would keep one SM working long after the others finished; neighbouring tiles of one
expert run side by side and read its weights from L2 after the first.

For more tokens per expert the grouped GEMM's large tiles win (it becomes compute-bound), so this
serves up to ``MAX_SLOTS`` slots. The reference is ``experts.loop_experts``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .triton_moe import _next_pow2, combine_triton, dot_t, interpreting, usable

# Above this many (token, expert) slots the grouped GEMM takes over (see the module docstring).
MAX_SLOTS = 8192
# Whether the model's prompt path uses this (on CUDA, see modeling/moe.py): a switch for benchmarks.
ENABLED = True
# (BLOCK_N, BLOCK_K, warps) the autotuner picks from per (N, K, MG).
_CONFIGS = ((32, 128, 4), (64, 128, 4), (64, 64, 4), (128, 64, 8))
INTERPRETER_CONFIG = 0


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl
    import triton.testing

    _dot_t = dot_t()
    globals().update(tl=tl, _dot_t=_dot_t)  # (the interpreter resolves the kernel's names here)

    @triton.jit
    def expert_gemm_sorted(x_ptr, w_ptr, order_ptr, count_ptr, out_ptr, N, K: tl.constexpr, E, stride_xm,
                           stride_we, stride_wn, stride_om, ROW_DIV: tl.constexpr, OWN_ROW: tl.constexpr,
                           RELU2: tl.constexpr, MG: tl.constexpr, E_P2: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        # Program t of axis 0 is tile t of the list (expert 0's chunks of MG slots, then expert 1's,
        # ...): an expert with many slots spreads over as many programs, which run side by side
        # (neighbours in launch order) and share its weight tiles through L2. Tiles past the list's
        # end (the grid is sized for the worst case) return at once. The order[] slots of expert e are
        # order[start_e : start_e + count_e], start_e the sum of the counts before e: every program
        # derives its tile from the E counts itself (scans in registers), so the host needs no cumsum
        # launches. Slot s reads x row s // ROW_DIV (up projection) or its own row s (down
        # projection: the up output of that slot) and writes out row s.
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_e = tl.arange(0, E_P2)
        counts = tl.load(count_ptr + offs_e, mask=offs_e < E, other=0).to(tl.int32)
        chunks = (counts + MG - 1) // MG
        ends = tl.cumsum(chunks, axis=0)
        t = tl.program_id(0)
        if t < tl.sum(chunks, axis=0):
            e = tl.sum((ends <= t).to(tl.int32), axis=0)
            mine = offs_e == e
            c0 = (t - tl.sum(tl.where(mine, ends - chunks, 0), axis=0)) * MG
            start = tl.sum(tl.where(mine, tl.cumsum(counts, axis=0) - counts, 0), axis=0)
            count = tl.sum(tl.where(mine, counts, 0), axis=0)
            w_base = w_ptr + e.to(tl.int64) * stride_we
            offs_m = tl.arange(0, MG)
            live = c0 + offs_m < count
            slot = tl.load(order_ptr + start + c0 + offs_m, mask=live, other=0).to(tl.int64)
            rows = slot if OWN_ROW else slot // ROW_DIV
            acc = tl.zeros((MG, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                xs = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                             mask=live[:, None] & (offs_k[None, :] < K), other=0.0)
                w = tl.load(w_base + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                            mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
                acc = _dot_t(xs, w, acc, IEEE)
            if RELU2:
                acc = tl.maximum(acc, 0.0)
                acc = acc * acc
            tl.store(out_ptr + slot[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=live[:, None] & (offs_n[None, :] < N))

    if interpreting():
        return expert_gemm_sorted, triton.cdiv
    tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w) for bn, bk, w in _CONFIGS],
        key=["N", "K", "MG"],
        cache_results=True,
        do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=3, rep=20, quantiles=quantiles),
    )(expert_gemm_sorted)
    return tuned, triton.cdiv


def supported(x: torch.Tensor, idx: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether ``sorted_experts`` takes these inputs: a prompt's slot count, one dtype, unit-stride
    rows, no autograd, and CUDA (or the interpreter)."""
    return (0 < idx.numel() <= MAX_SLOTS and x.dtype == up.dtype == down.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and up.stride(-1) == down.stride(-1) == 1 and not torch.is_grad_enabled() and usable(x))


def _project(x: torch.Tensor, w: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, row_div: Optional[int],
             relu2: bool, config: Optional[dict] = None) -> torch.Tensor:
    """One projection over the expert-sorted slots (``order``, and ``counts`` slots per expert);
    ``config`` (``BLOCK_N``, ``BLOCK_K``, ``num_warps``, optionally ``num_stages``) bypasses the
    autotuner (benchmarks/gpu_gemv_sweep.py)."""
    slots = order.numel()
    n_exp, n, k = w.shape
    out = torch.empty(slots, n, dtype=x.dtype, device=x.device)
    kernel, cdiv = _kernel()
    # Tiles of MG rows cover an expert's usual few slots with one weight pass (16: tl.dot's minimum);
    # more slots per expert on average take larger tiles.
    mg = min(64, max(16, _next_pow2(-(-slots // n_exp))))
    interp = interpreting()
    extra = dict(config or {})
    if interp and not extra:
        bn, bk, warps = _CONFIGS[INTERPRETER_CONFIG]
        extra = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}
    if extra and not interp:
        kernel = kernel.fn  # the plain kernel under the autotuner
    # The tile list has at most one part-filled chunk per expert beyond the full ones.
    tiles = n_exp + cdiv(slots, mg)
    grid = lambda meta: (tiles, cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    kernel[grid](x, w, order, counts, out, n, k, n_exp, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
                 ROW_DIV=row_div or 1, OWN_ROW=row_div is None, RELU2=relu2, MG=mg, E_P2=_next_pow2(n_exp),
                 IEEE=x.dtype == torch.float32, **extra)
    return out


def sorted_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   shared: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_j weights[t, j] * expert_{idx[t, j]}(x[t]) (+ shared[t])``, fp32 sum, one rounding: the
    slots sorted by expert (no host sync), two kernels for the projections, one combine."""
    from .experts import sort_by_expert

    topk = idx.shape[1]
    order, counts = sort_by_expert(idx, up.shape[0])
    h = _project(x.contiguous(), up, order, counts, topk, True)  # [slots, inter], slot order
    y = _project(h, down, order, counts, None, False)  # [slots, out], slot order
    return combine_triton(y, None, weights, shared, out_dtype=x.dtype)
