"""Routed experts for a handful of tokens (decode) as one Triton GEMV per projection.

At decode time each MoE layer sees a few (token, expert) slots; a grouped GEMM then spends most of
its time on scheduling 128 mostly-empty groups and on sorting. Here every program reads one
slot's expert rows straight from the stacked weights, so the step is a single pass over exactly
the weights the tokens use (memory-bound, as decode is) and needs no sort; the weighted sum over
the k experts (plus, optionally, the shared expert) is one ``combine_triton`` launch. The reference
is ``nemotron_core.ops.experts.loop_experts``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import triton_moe
from .triton_moe import combine_triton

# Above this many (token, expert) slots a grouped GEMM reuses weights across tokens and wins.
MAX_SLOTS = 64


# Configs (BLOCK_N, BLOCK_K, warps, GROUPED) the autotuner chooses from, per (N, K, slots); it caches
# its choice on disk, so a later process skips the search (about 1 s per shape for six configs).
# GROUPED: one program per (expert, N block) serves every slot routed to that expert, reading its
# weights once (tensor-core dot over the member rows) instead of once per slot: less weight traffic
# with several tokens per step (batch 8: ~48 slots on ~41 distinct experts). On the H200 it also won
# at batch 1 (6 slots): (32, 128, 4) for both projections there, (64, 256, 8) and (64, 128, 4) for
# the up and down projections at batch 8 (BENCHMARKS.md). Plain per-slot tiles remain for fp32 and
# other shapes; 8 warps keep more bytes in flight per SM than 4. Thirteen other plain tiles, and a
# variant that reduced across K once at the end, never won on the H200 and were dropped.
_PLAIN_TILES = ((32, 256, 8), (16, 512, 8))
_GROUPED_TILES = ((32, 128, 4), (64, 128, 4), (32, 256, 8), (64, 256, 8))
_CONFIGS = (tuple((bn, bk, w, False) for bn, bk, w in _PLAIN_TILES)
            + tuple((bn, bk, w, True) for bn, bk, w in _GROUPED_TILES))
# Dense single-row projections (BackendConfig(linear="triton")): (16, 512, 8) won every dense decode
# shape of the Nano model on the H200.
_DENSE_CONFIGS = tuple((bn, bk, w, False) for bn, bk, w in _PLAIN_TILES)
# The interpreter (CPU tests) cannot time configs: it runs this one (tests switch it, then rebuild).
INTERPRETER_CONFIG = 0


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl
    import triton.testing

    from .triton_moe import interpreting

    # The interpreter (CPU tests) cannot time configs: give it one, so the autotuner never benchmarks.
    configs = (_CONFIGS[INTERPRETER_CONFIG],) if interpreting() else _CONFIGS

    @triton.jit
    def _grouped_slots(x_ptr, w_ptr, expert_ptr, out_ptr, N, K: tl.constexpr, S, stride_xm, stride_we, stride_wn,
                       stride_om, slot, e, offs_n, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       ROW_DIV: tl.constexpr, RELU2: tl.constexpr, S_P2: tl.constexpr, MG: tl.constexpr,
                       IEEE: tl.constexpr):
        """The slots routed to expert ``e``, computed by the program of the first of them (the others
        return at once): its weight tile is read once per K step and multiplied into all member rows."""
        offs_s = tl.arange(0, S_P2)
        ids = tl.load(expert_ptr + offs_s, mask=offs_s < S, other=-1).to(tl.int64)
        same = (ids == e) & (offs_s < S)
        if tl.min(tl.where(same, offs_s, S_P2), axis=0) == slot:
            # Member m of the group = the slot whose running count of members is m.
            rank = tl.cumsum(same.to(tl.int32), axis=0) - 1
            offs_m = tl.arange(0, MG)
            pick = same[None, :] & (rank[None, :] == offs_m[:, None])
            member = tl.sum(tl.where(pick, offs_s[None, :], 0), axis=1)
            valid = offs_m < tl.sum(same.to(tl.int32), axis=0)
            rows = (member // ROW_DIV).to(tl.int64)
            acc = tl.zeros((MG, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                xs = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                             mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)
                w = tl.load(w_ptr + e * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :],
                            mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
                if IEEE:  # fp32 inputs keep full precision (no TF32)
                    acc = tl.dot(xs, tl.trans(w), acc, input_precision="ieee")
                else:  # bf16/fp16 products are exact in the fp32 accumulator
                    acc = tl.dot(xs, tl.trans(w), acc)
            if RELU2:
                acc = tl.maximum(acc, 0.0)
                acc = acc * acc
            tl.store(out_ptr + member[:, None].to(tl.int64) * stride_om + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))

    @triton.jit
    def expert_gemv(x_ptr, w_ptr, expert_ptr, out_ptr, N, K: tl.constexpr, S,
                    stride_xm, stride_we, stride_wn, stride_om,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_DIV: tl.constexpr, RELU2: tl.constexpr,
                    SINGLE: tl.constexpr, GROUPED: tl.constexpr,
                    S_P2: tl.constexpr, MG: tl.constexpr, IEEE: tl.constexpr):
        # K (the loop bound) is a constexpr: a model has two or three expert widths, so this costs as
        # many compiles, and Triton 3.6's interpreter cannot loop to a runtime bound on numpy >= 2.4.
        # Slot s = (token s // top_k, its (s % top_k)-th expert): the up projection reads x row
        # s // top_k (ROW_DIV = top_k), the down projection its own row s (ROW_DIV = 1). Deriving the
        # row here saves the host-side arange/repeat_interleave launches.
        slot = tl.program_id(0)
        pid_n = tl.program_id(1)
        if SINGLE:  # a dense projection: one weight matrix, no expert ids
            e = 0
        else:
            e = tl.load(expert_ptr + slot).to(tl.int64)  # int64 router ids, or int32
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if GROUPED and not SINGLE:
            _grouped_slots(x_ptr, w_ptr, expert_ptr, out_ptr, N, K, S, stride_xm, stride_we, stride_wn, stride_om,
                           slot, e, offs_n, BLOCK_N, BLOCK_K, ROW_DIV, RELU2, S_P2, MG, IEEE)
            return
        row = (slot // ROW_DIV).to(tl.int64)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + e * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        if RELU2:
            acc = tl.maximum(acc, 0.0)
            acc = acc * acc
        tl.store(out_ptr + slot * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)

    globals().update(tl=tl, _grouped_slots=_grouped_slots)  # the interpreter resolves names here

    def tuned(choices):
        return triton.autotune(
            configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUPED": grouped}, num_warps=w)
                     for bn, bk, w, grouped in choices],
            key=["N", "K", "S"],
            cache_results=True,
            # Each call takes tens of microseconds: 25 ms of timing per config is over a thousand
            # calls, and keeps the first call's search short.
            do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles),
        )(expert_gemv)

    # Two tuners over one kernel: a dense projection (SINGLE) has no expert groups to try, and a
    # model has many dense shapes, each searched once.
    if interpreting():
        experts = dense = tuned(configs)
    else:
        experts, dense = tuned(configs), tuned(_DENSE_CONFIGS)
    return experts, dense, triton.cdiv


def _gemv(x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor | None, row_div: int, relu2: bool,
          tokens: int = 1) -> torch.Tensor:
    """Row s of the result: ``w[experts[s]] @ x[s // row_div]`` (relu2'd if asked); with
    ``experts=None``, ``w`` holds one matrix and row s is ``w[0] @ x[s]``."""
    experts_kernel, dense_kernel, cdiv = _kernel()
    kernel = dense_kernel if experts is None else experts_kernel
    n, k = w.shape[1], w.shape[2]
    rows = experts.shape[0] if experts is not None else x.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (rows, cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    # A group holds at most one slot per token (a token's experts are distinct): MG >= tokens rows
    # cover it (tl.dot wants at least 16).
    kernel[grid](x, w, experts if experts is not None else x, out, n, k, rows, x.stride(0), w.stride(0), w.stride(1),
                 out.stride(0), ROW_DIV=row_div, RELU2=relu2, SINGLE=experts is None,
                 S_P2=triton_moe._next_pow2(rows), MG=max(16, triton_moe._next_pow2(tokens)),
                 IEEE=x.dtype == torch.float32)
    return out


# Dense projections of at most this many rows (batch-1 decode) may take the GEMV instead of cuBLAS.
# Each program reads its weight tile for one row only, so more rows would re-read the weights.
MAX_DENSE_ROWS = 1


def dense_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``dense_gemv`` takes ``x [..., K]`` against ``weight [N, K]``: CUDA (or the CPU
    interpreter), a few rows, contiguous last dims, one dtype."""
    if x.numel() > MAX_DENSE_ROWS * x.shape[-1] or x.dtype != weight.dtype or weight.stride(-1) != 1:
        return False
    return triton_moe.usable(x)


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, relu2: bool = False) -> torch.Tensor:
    """``x @ weight.T`` (then relu2 if asked) for a few rows, as one GEMV launch: at decode cuBLAS
    uses a split-K GEMM plus a reduction kernel per projection. ``x [..., K]``, ``weight [N, K]``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    return _gemv(x2, weight.unsqueeze(0), None, row_div=1, relu2=relu2).view(*lead, weight.shape[0])


def takes(device: torch.device, slots: int) -> bool:
    """Whether a forward over ``slots`` (token, expert) pairs on ``device`` goes to the GEMV."""
    if device.type != "cuda" or slots > MAX_SLOTS:
        return False
    try:
        _kernel()
    except ImportError:
        return False
    return True


def supported(x: torch.Tensor, idx: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> bool:
    if up.stride(-1) != 1 or down.stride(-1) != 1 or x.stride(-1) != 1:
        return False
    return takes(x.device, idx.numel())


def gemv_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, up: torch.Tensor,
                 down: torch.Tensor, shared: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_j weights[t, j] * expert_{idx[t, j]}(x[t]) (+ shared[t])``: three launches in all.

    ``idx`` may be the router's int64 ids as they are; ``shared`` (``[N, out]``, optional) is added
    in fp32 before the one rounding to ``x.dtype``, as in ``loop_experts``.
    """
    ntok, topk = idx.shape
    experts = idx.reshape(-1)  # a view of the router's contiguous output: no launch
    h = _gemv(x.contiguous(), up, experts, row_div=topk, relu2=True, tokens=ntok)  # [slots, inter]
    y = _gemv(h, down, experts, row_div=1, relu2=False, tokens=ntok)  # [slots, out], slot order
    return combine_triton(y, None, weights, shared, out_dtype=x.dtype)
