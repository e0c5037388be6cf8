"""One row times a weight matrix (a batch-1 decode projection) as one Triton kernel with split K.

A decode step's dense projections read their weights once and are bound by that read. cuBLAS runs
the narrow ones (N = 2688 outputs over K = 4096 inputs: the Mamba out_proj and attention o_proj of
the Nano model) as a split-K GEMM plus a reduction kernel, and reached about 2.2 TB/s on the H200,
about 10 us a call; a plain GEMV with one program per block of rows has too few programs for the
132 SMs (84 at 32 rows each). Here each of SPLIT programs per row block reads a K range; the
partial sums go to a small fp32 workspace, and the last program of a row block to finish (an
atomic counter per block) adds them up in a fixed order (deterministic), adds the residual if any,
and writes the result, rounded once. So the reduction needs no second launch, and the counters are
reset by that last program, so the same buffer serves the next call (and CUDA graph replays).

The counters are one buffer per device: calls must not run concurrently on two streams.

Where a program's whole weight slice fits in registers (16 rows of a power-of-two slice of K, at most
64 KB: the Nano model's out_proj and o_proj, K = 4096), ``gemv_preload`` runs instead: each program
loads its slice first and only then waits for the previous kernel (``gdc_wait``) and reads x. On
sm_90 it is launched with programmatic dependent launch, so a predecessor that signals its
dependents early (the fused Mamba step, the attention combine) overlaps the weight stream; alone it
is as fast as the split-K kernel (9.27 against 9.36 us on the H200, ``benchmarks/gpu_pdl.py``).

Under PDL the split-K kernel also takes part: it signals its dependents at its start (the fused Mamba
step behind in_proj loads its SSM state meanwhile), and it is itself launched early (``EARLY``),
loading its first weight tiles (``EARLY_TILES``) before waiting for the kernel ahead (the MoE combine
before in_proj).

``gemv_reference`` is the plain-PyTorch definition. The kernel also runs under Triton's interpreter
(CPU tests).
"""
from __future__ import annotations

import functools

import torch

from .triton_moe import dot_t, interpreting, pdl_launch, pinned_for, usable

# Launch configs (BLOCK_N, BLOCK_K, SPLIT, warps, stages) the autotuner picks from per (N, K).
# SPLIT 1 serves wide projections (the Mamba in_proj, 10304 rows, and the LM head); the others
# give narrow ones enough programs.
_CONFIGS = ((32, 128, 1, 4, 4), (64, 128, 1, 4, 4), (32, 256, 1, 4, 3),
            (32, 128, 2, 4, 4), (32, 128, 4, 4, 4), (16, 128, 4, 4, 4), (32, 256, 2, 4, 4), (16, 256, 2, 4, 4))
INTERPRETER_CONFIG = 4
_MAX_BLOCKS = 1 << 16  # row blocks the counter buffer covers (N up to 1M rows at 16 per block)


# The register-preload kernel (``gemv_preload``), for shapes where a program's whole weight slice fits
# in registers: a global switch, so a benchmark can measure with and without.
PRELOAD = True
_PRELOAD_BYTES = 64 * 1024  # weight bytes per program (8 warps: 64 registers a thread)
_PRELOAD_BLOCK_N = 16
_preload: list = []  # the kernel, once built
# Under PDL: the split-K GEMV is launched to start while the kernel before it runs (where that one
# signals early: the MoE combine before the next block's in_proj), loading its first weight tile
# before it waits. A switch for benchmarks.
EARLY = True
# Weight tiles (of BLOCK_K columns, a power of two) that an early split-K GEMV loads before it waits:
# more of in_proj's weights stream while the MoE combine before it (one program at batch 1) runs. On
# the H200, batch 1 against one tile: 2 tiles +0.35%, 4 tiles +1.0% (three A/Bs), 8 tiles -3% (the
# registers held cost resident programs); batch 8 unchanged (``benchmarks/gpu_ab.py --switch early_tiles4``).
EARLY_TILES = 4
# The split-K kernel's config for wide projections (at least PIN_MIN_ROWS outputs: the Nano model's
# in_proj, 10304 x 2688, and the LM head), per GPU architecture (compute capability), taken instead of
# the autotuner's pick. Timed alone, one split and two are close: the autotuner took SPLIT 1 for in_proj
# in one run on the H200 and SPLIT 2 in the next. In the model in_proj starts early behind the MoE
# combine, and SPLIT 2's twice as many programs take SM slots that the combine needs (3.7 -> 5.8 us a
# call in the graph's timeline): batch 1 ran 5% slower (BENCHMARKS.md, tenth session). With 322 row
# blocks of 32 (over two waves on 132 SMs) a split buys nothing. PIN: a switch for benchmarks.
PINNED: dict[tuple[int, int], dict] = {
    (9, 0): {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT": 1, "num_warps": 4, "num_stages": 4}}
PIN_MIN_ROWS = 8192
PIN = True


def preload_split(n: int, k: int, elem: int) -> int:
    """The split of K for ``gemv_preload`` (0 where it does not take the shape): the fewest splits whose
    slice is a power of two of at most ``_PRELOAD_BYTES`` a program."""
    split = 1
    while split <= 16:
        ks = k // split
        if k % split == 0 and ks & (ks - 1) == 0 and _PRELOAD_BLOCK_N * ks * elem <= _PRELOAD_BYTES:
            return split
        split *= 2
    return 0


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl
    import triton.testing

    _dot_t = dot_t()

    @triton.jit
    def _epilogue(y, res_ptr, out_ptr, offs_n, mask_n, RELU2: tl.constexpr, HAS_RES: tl.constexpr):
        if RELU2:  # the MLP activation, relu(y)^2
            y = tl.maximum(y, 0.0)
            y = y * y
        if HAS_RES:  # added in fp32 before the one rounding, as cuBLAS's addmm does
            y += tl.load(res_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def gemv_split_k(x_ptr, w_ptr, res_ptr, out_ptr, part_ptr, count_ptr, N, K: tl.constexpr, stride_wn,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, RELU2: tl.constexpr,
                     HAS_RES: tl.constexpr, IEEE: tl.constexpr, TRIGGER: tl.constexpr, WAIT: tl.constexpr,
                     EARLY_TILES: tl.constexpr):
        if TRIGGER:  # a kernel launched with PDL behind this one (the fused Mamba step) may start now
            gdc_launch_dependents()
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        # The row as row 0 of a 16-row tile (tl.dot's minimum): the weights stream through the
        # dot's pipelined loads, which beat plain loads here; the other 15 rows are zeros.
        rows = tl.arange(0, 16)
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        FIRST: tl.constexpr = BLOCK_K * EARLY_TILES
        if WAIT:
            # Launched with PDL: the first EARLY_TILES weight tiles are loaded while the kernel before
            # still runs (it signalled at its start), then wait for it before reading x; everything
            # is stored after the wait.
            # (Own names: the loop below carries offs_k, in_k, xs and w at one tile's width.)
            offs_f = pid_k * ((K + SPLIT - 1) // SPLIT) + tl.arange(0, FIRST)
            in_f = (offs_f < K) & (tl.arange(0, FIRST) < (K + SPLIT - 1) // SPLIT)
            w_f = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_f[None, :],
                          mask=mask_n[:, None] & in_f[None, :], other=0.0)
            gdc_wait()
            x_f = tl.load(x_ptr + rows[:, None] * 0 + offs_f[None, :], mask=(rows[:, None] == 0) & in_f[None, :],
                          other=0.0)
            acc = _dot_t(x_f, w_f, acc, IEEE)
        START: tl.constexpr = BLOCK_K * EARLY_TILES * WAIT
        for k0 in range(START, (K + SPLIT - 1) // SPLIT, BLOCK_K):  # this split's K range
            offs_k = pid_k * ((K + SPLIT - 1) // SPLIT) + k0 + tl.arange(0, BLOCK_K)
            in_k = (offs_k < K) & (k0 + tl.arange(0, BLOCK_K) < (K + SPLIT - 1) // SPLIT)
            xs = tl.load(x_ptr + rows[:, None] * 0 + offs_k[None, :], mask=(rows[:, None] == 0) & in_k[None, :],
                         other=0.0)
            w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                        mask=mask_n[:, None] & in_k[None, :], other=0.0)
            acc = _dot_t(xs, w, acc, IEEE)
        y = tl.sum(acc, axis=0)  # row 0 (the others are 0)
        _finish(y, res_ptr, out_ptr, part_ptr, count_ptr, pid_n, pid_k, offs_n, mask_n, N, SPLIT, RELU2, HAS_RES)

    @triton.jit
    def _finish(y, res_ptr, out_ptr, part_ptr, count_ptr, pid_n, pid_k, offs_n, mask_n, N, SPLIT: tl.constexpr,
                RELU2: tl.constexpr, HAS_RES: tl.constexpr):
        """This split's partial ``y``: with one split, the result; else stored, and the last split of the
        row block to finish adds them all up (fixed order) and writes the result."""
        if SPLIT > 1:
            tl.store(part_ptr + pid_k * N + offs_n, y, mask=mask_n)
            # Every thread's partial stored before the counter moves (the atomic releases them at
            # GPU scope); then learn whether every other split of this row block is done.
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
            if done == SPLIT - 1:
                y = tl.zeros(offs_n.shape, dtype=tl.float32)
                for s in tl.static_range(SPLIT):  # a fixed order: the same bits every time
                    y += tl.load(part_ptr + s * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(count_ptr + pid_n, 0)  # ready for the next call
                _epilogue(y, res_ptr, out_ptr, offs_n, mask_n, RELU2, HAS_RES)
        else:
            _epilogue(y, res_ptr, out_ptr, offs_n, mask_n, RELU2, HAS_RES)

    @triton.jit
    def gemv_preload(x_ptr, w_ptr, res_ptr, out_ptr, part_ptr, count_ptr, N, K: tl.constexpr, stride_wn,
                     BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, RELU2: tl.constexpr, HAS_RES: tl.constexpr,
                     PDL: tl.constexpr):
        # The program's whole weight slice (BLOCK_N x K/SPLIT) goes into registers before anything
        # else: launched with PDL it runs while the previous kernel still does (nothing in the
        # stream writes weights), and gdc_wait then makes that kernel's writes (x, the residual,
        # the counters' resets) visible.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        KS: tl.constexpr = K // SPLIT
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * KS + tl.arange(0, KS)
        mask_n = offs_n < N
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :], mask=mask_n[:, None],
                    other=0.0)
        if PDL:
            gdc_wait()
        x = tl.load(x_ptr + offs_k).to(tl.float32)
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        _finish(y, res_ptr, out_ptr, part_ptr, count_ptr, pid_n, pid_k, offs_n, mask_n, N, SPLIT, RELU2, HAS_RES)

    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    # The interpreter resolves names through the module's globals.
    globals().update(tl=tl, _dot_t=_dot_t, _epilogue=_epilogue, _finish=_finish, gdc_wait=gdc_wait,
                     gdc_launch_dependents=gdc_launch_dependents)
    _preload.append(gemv_preload)
    if interpreting():
        return gemv_split_k, gemv_split_k, triton.cdiv  # configs are chosen by the caller (no timing here)
    tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": sp}, num_warps=w, num_stages=st)
                 for bn, bk, sp, w, st in _CONFIGS],
        key=["N", "K"],
        cache_results=True,
        do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles),
    )(gemv_split_k)
    return tuned, gemv_split_k, triton.cdiv


@functools.lru_cache(maxsize=None)
def _counters(device: torch.device) -> torch.Tensor:
    # Zeroed once; each call's last program per row block puts its counter back to 0.
    return torch.zeros(_MAX_BLOCKS, dtype=torch.int32, device=device)


def pinned_config(device: torch.device, n: int) -> dict | None:
    """The pinned config of an ``n``-output projection on ``device`` (``PINNED``), or None: the
    autotuner's."""
    return pinned_for(PINNED, device) if PIN and n >= PIN_MIN_ROWS else None


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``gemv`` takes ``x`` (one row, ``[..., K]``) against ``weight [N, K]``."""
    return (x.numel() == x.shape[-1] == weight.shape[1] and weight.dim() == 2 and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and weight.stride(1) == 1
            and weight.shape[0] <= 16 * _MAX_BLOCKS and usable(x))


def gemv(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None, relu2: bool = False,
         config: dict | None = None) -> torch.Tensor:
    """``x @ weight.T`` (then relu2 if asked; or ``+ residual``, added in fp32 before the one rounding)
    for one row ``x [..., K]``;
    ``[..., N]`` in x's dtype. ``config`` (``BLOCK_N``, ``BLOCK_K``, ``SPLIT``, ``num_warps``,
    ``num_stages``) bypasses the autotuner."""
    if not supported(x, weight):
        raise ValueError(f"gemv takes one row against a matrix of its width and dtype, got x {tuple(x.shape)} "
                         f"{x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    n, k = weight.shape
    lead = x.shape[:-1]
    x = x.reshape(k).contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    res = residual.reshape(n).contiguous() if residual is not None else out
    tuned, plain, cdiv = _kernel()
    split = preload_split(n, k, x.element_size()) if PRELOAD and config is None else 0
    if split:
        part = torch.empty(split, n, dtype=torch.float32, device=x.device)
        pdl = pdl_launch(x)
        _preload[0][(cdiv(n, _PRELOAD_BLOCK_N), split)](
            x, weight, res, out, part, _counters(x.device), n, k, weight.stride(0), BLOCK_N=_PRELOAD_BLOCK_N,
            SPLIT=split, RELU2=relu2, HAS_RES=residual is not None, PDL=pdl, num_warps=8, launch_pdl=pdl)
        return out.view(*lead, n)
    config = config or pinned_config(x.device, n)
    if config is None and interpreting():
        bn, bk, sp, w, st = _CONFIGS[INTERPRETER_CONFIG]
        config = {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": sp, "num_warps": w, "num_stages": st}
    # The workspace for the largest split a config may use (a few KB: N fp32 per split).
    splits = max(c[2] for c in _CONFIGS) if config is None else config["SPLIT"]
    part = torch.empty(splits, n, dtype=torch.float32, device=x.device)
    grid = lambda meta: (cdiv(n, meta["BLOCK_N"]), meta["SPLIT"])  # noqa: E731
    launch = tuned[grid] if config is None else functools.partial(plain[grid], **config)
    pdl = pdl_launch(x)
    wait = EARLY and pdl
    launch(x, weight, res, out, part, _counters(x.device), n, k, weight.stride(0),
           RELU2=relu2, HAS_RES=residual is not None, IEEE=x.dtype == torch.float32, TRIGGER=pdl,
           WAIT=wait, EARLY_TILES=EARLY_TILES if wait else 1, launch_pdl=wait)
    return out.view(*lead, n)


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
                   relu2: bool = False) -> torch.Tensor:
    """What ``gemv`` computes: fp32 products and sums, relu2 or the residual in fp32, one rounding."""
    y = x.float() @ weight.float().t()
    if relu2:
        y = torch.relu(y).square()
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)

