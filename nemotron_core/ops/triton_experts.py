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
# A grouped tile finds its members through an [MG, S_P2] selection in registers (MG >= tokens rows,
# S_P2 >= slots): above this many elements (e.g. 512 tokens: 512 x 4096) only plain tiles compile.
MAX_GROUP_TILE = 8192


# Configs (BLOCK_N, BLOCK_K, warps, GROUPED) the autotuner chooses from, per (N, K, slots); it caches
# its choice on disk, so a later process skips the search (about 1 s per shape for six configs).
# GROUPED: one program per (expert, N block) serves every slot routed to that expert, reading its
# weights once (tensor-core dot over the member rows) instead of once per slot: less weight traffic
# with several tokens per step (batch 8: ~48 slots on ~41 distinct experts). On the H200 it also won
# at batch 1 (6 slots): the ninth session's fresh autotune picked (64, 128, 4) for both projections at
# batch 1 and 8, which beat (32, 128, 4) inside the model by 0.6-1% (BENCHMARKS.md); a pick timed in
# another process's isolated call (a test's) left batch 1 10% slower. Plain per-slot tiles remain for fp32 and
# other shapes; 8 warps keep more bytes in flight per SM than 4. Thirteen other plain tiles, and a
# variant that reduced across K once at the end, never won on the H200 and were dropped.
_PLAIN_TILES = ((32, 256, 8), (16, 512, 8))
_GROUPED_TILES = ((32, 128, 4), (64, 128, 4), (32, 256, 8), (64, 256, 8))
_CONFIGS = (tuple((bn, bk, w, False) for bn, bk, w in _PLAIN_TILES)
            + tuple((bn, bk, w, True) for bn, bk, w in _GROUPED_TILES))
# The interpreter (CPU tests) cannot time configs: it runs this one (tests switch it, then rebuild).
INTERPRETER_CONFIG = 0
# With the shared expert among the slots, on sm_90+: the up projection is launched with programmatic
# dependent launch behind the route kernel, whose start signals it, so the shared expert's programs
# stream their weights while the routing is computed (``expert_gemv``). A switch for benchmarks.
SHARED_AHEAD = True
# A config (``_gemv``'s ``config``) every call takes instead of the autotuner's pick: for benchmarks that
# compare configs inside the model, where the timings differ from the autotuner's isolated ones.
FORCE_CONFIG: dict | None = None
# The config of 16-bit calls that fit a grouped tile (the decode step's), per GPU architecture (compute
# capability), taken instead of the autotuner's pick. The autotuner times each config alone, on its own
# inputs, and caches the pick on disk for every later process; inside the model the kernel shares the
# SMs with the early launches around it, where a pick timed alone (a test's, at the model's shapes)
# left batch 1 10% slower on the H200. This is the pick made and measured inside the model there
# (BENCHMARKS.md, ninth and tenth sessions); other architectures keep the autotuner. PIN: a switch for
# benchmarks.
PINNED: dict[tuple[int, int], dict] = {(9, 0): {"BLOCK_N": 64, "BLOCK_K": 128, "GROUPED": True, "num_warps": 4}}
PIN = True
# On sm_90+: the down projection is launched with PDL behind the up projection, which signals it
# once its router ids are known; it loads its first weight tile before waiting. A switch for benchmarks.
DOWN_EARLY = True


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl
    import triton.testing

    _dot_t = triton_moe.dot_t()

    from .triton_moe import interpreting

    # The interpreter (CPU tests) cannot time configs: give it one, so the autotuner never benchmarks.
    configs = (_CONFIGS[INTERPRETER_CONFIG],) if interpreting() else _CONFIGS

    @triton.jit
    def _expert_of(s, valid, expert_ptr, R, E, PARTS: tl.constexpr):
        """Expert id of slot(s) ``s``: the routed slots [0, R) read theirs; the shared expert's
        parts follow them, PARTS a token, as ids E, E + 1, ... (see ``gemv_experts``)."""
        if PARTS == 0:
            return tl.load(expert_ptr + s, mask=valid, other=-1).to(tl.int64)
        else:
            routed = s < R
            ids = tl.load(expert_ptr + s, mask=valid & routed, other=-1).to(tl.int64)
            return tl.where(routed, ids, E + (s - R) % PARTS)

    @triton.jit
    def _row_of(s, R, ROW_DIV: tl.constexpr, PARTS: tl.constexpr, OWN_ROW: tl.constexpr):
        """Input row of slot(s) ``s``: its own (down projection: the up output of that slot), or its
        token's (up projection: routed slot s is token s // ROW_DIV, shared part slots PARTS a token)."""
        if OWN_ROW:
            return s
        elif PARTS == 0:
            return s // ROW_DIV
        else:
            return tl.where(s < R, s // ROW_DIV, (s - R) // PARTS)

    @triton.jit
    def _weights_of(e, w_ptr, ws_ptr, E, stride_we, stride_wn, stride_sn, part_off, PARTS: tl.constexpr):
        """(first element, row stride) of expert ``e``'s weight matrix: a routed expert's slice of the
        stacked weights, or part e - E of the shared expert's matrix."""
        base = w_ptr + e * stride_we
        row = tl.cast(stride_wn, tl.int64)
        if PARTS > 0:
            if e >= E:
                base = ws_ptr + (e - E) * part_off
                row = tl.cast(stride_sn, tl.int64)
        return base, row

    @triton.jit
    def _before_stores(slot, R, PDL: tl.constexpr, TRIGGER: tl.constexpr):
        """Under PDL (see ``expert_gemv``): wait for the route kernel before storing (a shared part's
        program did not wait yet), and a shared part's program then lets the down projection start."""
        if PDL:
            gdc_wait()
            if TRIGGER:
                if slot >= R:
                    gdc_launch_dependents()

    @triton.jit
    def _grouped_slots(x_ptr, w_ptr, ws_ptr, expert_ptr, out_ptr, N, K: tl.constexpr, S, R, E,
                       stride_xm, stride_we, stride_wn, stride_sn, part_off, stride_om, slot, e, offs_n,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_DIV: tl.constexpr, OWN_ROW: tl.constexpr,
                       PARTS: tl.constexpr, RELU2: tl.constexpr, S_P2: tl.constexpr, MG: tl.constexpr,
                       IEEE: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr, WAIT_X: tl.constexpr):
        """The slots routed to expert ``e``, computed by the program of the first of them (the others
        return at once): its weight tile is read once per K step and multiplied into all member rows."""
        offs_s = tl.arange(0, S_P2)
        # A shared-expert part's group has no routed slot: it reads no router id (which, under PDL,
        # the route kernel may still be writing).
        ids = _expert_of(offs_s, (offs_s < S) & ((e < E) | (offs_s >= R)), expert_ptr, R, E, PARTS)
        same = (ids == e) & (offs_s < S)
        if tl.min(tl.where(same, offs_s, S_P2), axis=0) == slot:
            # Member m of the group = the slot whose running count of members is m.
            rank = tl.cumsum(same.to(tl.int32), axis=0) - 1
            offs_m = tl.arange(0, MG)
            pick = same[None, :] & (rank[None, :] == offs_m[:, None])
            member = tl.sum(tl.where(pick, offs_s[None, :], 0), axis=1)
            valid = offs_m < tl.sum(same.to(tl.int32), axis=0)
            rows = _row_of(member, R, ROW_DIV, PARTS, OWN_ROW).to(tl.int64)
            w_base, w_row = _weights_of(e, w_ptr, ws_ptr, E, stride_we, stride_wn, stride_sn, part_off, PARTS)
            acc = tl.zeros((MG, BLOCK_N), dtype=tl.float32)
            if WAIT_X:  # (see expert_gemv) the first weight tile while the up projection finishes
                offs_k = tl.arange(0, BLOCK_K)
                w = tl.load(w_base + offs_n[:, None] * w_row + offs_k[None, :],
                            mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
                gdc_wait()
                xs = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                             mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)
                acc = _dot_t(xs, w, acc, IEEE)
            START: tl.constexpr = BLOCK_K * WAIT_X
            for k0 in range(START, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                xs = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                             mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)
                w = tl.load(w_base + offs_n[:, None] * w_row + offs_k[None, :],
                            mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
                acc = _dot_t(xs, w, acc, IEEE)
            if RELU2:
                acc = tl.maximum(acc, 0.0)
                acc = acc * acc
            _before_stores(slot, R, PDL, TRIGGER)
            mask = valid[:, None] & (offs_n[None, :] < N)
            tl.store(out_ptr + member[:, None].to(tl.int64) * stride_om + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def expert_gemv(x_ptr, w_ptr, ws_ptr, expert_ptr, out_ptr, N, K: tl.constexpr, S, R, E,
                    stride_xm, stride_we, stride_wn, stride_sn, part_off, stride_om,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_DIV: tl.constexpr, OWN_ROW: tl.constexpr,
                    PARTS: tl.constexpr, RELU2: tl.constexpr, GROUPED: tl.constexpr, S_P2: tl.constexpr,
                    MG: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr,
                    WAIT_X: tl.constexpr):
        # K (the loop bound) is a constexpr: a model has two or three expert widths, so this costs as
        # many compiles, and Triton 3.6's interpreter cannot loop to a runtime bound on numpy >= 2.4.
        # Slot s < R = (token s // top_k, its (s % top_k)-th expert): the up projection reads x row
        # s // top_k (ROW_DIV = top_k), the down projection its own row s (OWN_ROW). Deriving the row
        # here saves the host-side arange/repeat_interleave launches. Slots from R on are the shared
        # expert's PARTS parts per token (``gemv_experts``).
        # PDL (launched with programmatic dependent launch right behind the route kernel, which lets
        # it start at once): a routed slot's program waits for the route kernel's ids; a shared part's
        # program needs nothing from it, so it streams its weights meanwhile and waits only before
        # its stores (the route kernel's inputs may be freed memory that this output reuses).
        # TRIGGER: let the next kernel (the down projection, WAIT_X) start, but only after this
        # program's wait (it reads the router's ids before its own wait). WAIT_X: that down
        # projection, launched with PDL: ids and the first weight tile first, then wait for the up
        # projection before reading x; every store after the wait.
        slot = tl.program_id(0)
        pid_n = tl.program_id(1)
        if PDL:
            if slot < R:
                gdc_wait()
                if TRIGGER:
                    gdc_launch_dependents()
        elif TRIGGER:
            gdc_launch_dependents()
        e = _expert_of(slot, slot < S, expert_ptr, R, E, PARTS)  # int64 router ids, or int32
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if GROUPED:
            _grouped_slots(x_ptr, w_ptr, ws_ptr, expert_ptr, out_ptr, N, K, S, R, E, stride_xm, stride_we,
                           stride_wn, stride_sn, part_off, stride_om, slot, e, offs_n, BLOCK_N, BLOCK_K,
                           ROW_DIV, OWN_ROW, PARTS, RELU2, S_P2, MG, IEEE, PDL, TRIGGER, WAIT_X)
            return
        row = _row_of(slot, R, ROW_DIV, PARTS, OWN_ROW).to(tl.int64)
        w_base, w_row = _weights_of(e, w_ptr, ws_ptr, E, stride_we, stride_wn, stride_sn, part_off, PARTS)
        if WAIT_X:
            gdc_wait()
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            w = tl.load(w_base + offs_n[:, None] * w_row + offs_k[None, :],
                        mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        if RELU2:
            acc = tl.maximum(acc, 0.0)
            acc = acc * acc
        _before_stores(slot, R, PDL, TRIGGER)
        tl.store(out_ptr + slot * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)

    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    globals().update(tl=tl, _dot_t=_dot_t, _before_stores=_before_stores, _grouped_slots=_grouped_slots,
                     _expert_of=_expert_of, _row_of=_row_of, _weights_of=_weights_of, gdc_wait=gdc_wait,
                     gdc_launch_dependents=gdc_launch_dependents)  # the interpreter resolves names here

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

    # Two tuners over one kernel: inputs with too many slots for a grouped tile have their own list
    # (``_gemv``).
    if interpreting():
        experts = plain = tuned(configs)
    else:
        experts, plain = tuned(configs), tuned(tuple(c for c in _CONFIGS if not c[3]))
    return experts, plain, triton.cdiv


def _gemv(x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor, row_div: int | None, relu2: bool,
          tokens: int = 1, shared_w: torch.Tensor | None = None, parts: int = 0,
          split_rows: bool = True, config: dict | None = None, pdl: bool = False, trigger: bool = False,
          wait_x: bool = False) -> torch.Tensor:
    """Row s of the result: ``w[experts[s]] @ x[s // row_div]`` (``x[s]`` when ``row_div`` is None),
    relu2'd if asked.

    With ``shared_w`` (the shared expert's matrix, ``parts`` times an expert's size, cut along its
    rows (``split_rows``) or its columns), ``tokens * parts`` slots follow the routed ones: slot
    ``R + t * parts + j`` is part j of it applied to token t (x row t, or the slot's own row).
    ``config`` (``BLOCK_N``, ``BLOCK_K``, ``GROUPED``, ``num_warps``, ``num_stages``) bypasses the
    autotuner (``benchmarks/gpu_gemv_sweep.py`` times candidates this way). ``pdl``, ``trigger``,
    ``wait_x``: the up projection behind the route kernel, and the down projection behind it, under
    programmatic dependent launch (see ``expert_gemv``; sm_90+, compiled).
    """
    experts_kernel, plain_kernel, cdiv = _kernel()
    n, k = w.shape[1], w.shape[2]
    routed = experts.shape[0]
    rows = routed + tokens * parts
    s_p2, mg = triton_moe._next_pow2(rows), max(16, triton_moe._next_pow2(tokens))
    # A grouped tile that would not fit: plain tiles only.
    grouped = s_p2 * mg <= MAX_GROUP_TILE
    kernel = experts_kernel if grouped else plain_kernel
    config = config or FORCE_CONFIG or (pinned_config(x.device) if grouped and x.dtype != torch.float32 else None)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (rows, cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    if shared_w is None:
        stride_sn, part_off = 0, 0
    else:
        stride_sn = shared_w.stride(0)
        part_off = n * shared_w.stride(0) if split_rows else k * shared_w.stride(1)
    # A group holds at most one slot per token (a token's experts are distinct, and so are its shared
    # parts): MG >= tokens rows cover it (tl.dot wants at least 16).
    launch = kernel[grid] if config is None else functools.partial(kernel.fn[grid], **config)
    launch(x, w, shared_w, experts, out, n, k, rows, routed, w.shape[0],
           x.stride(0), w.stride(0), w.stride(1), stride_sn, part_off, out.stride(0),
           ROW_DIV=row_div or 1, OWN_ROW=row_div is None, PARTS=parts, RELU2=relu2, S_P2=s_p2, MG=mg,
           IEEE=x.dtype == torch.float32, PDL=pdl, TRIGGER=trigger, WAIT_X=wait_x, launch_pdl=pdl or wait_x)
    return out


def pinned_config(device: torch.device) -> dict | None:
    """The pinned config of a grouped 16-bit call on ``device`` (``PINNED``), or None: the autotuner's."""
    return triton_moe.pinned_for(PINNED, device) if PIN else None


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


def shared_parts(up: torch.Tensor, down: torch.Tensor, shared_up: torch.Tensor, shared_down: torch.Tensor) -> int:
    """Into how many routed-expert-sized parts the shared expert (``shared_up [P * inter, in]``,
    ``shared_down [out, P * inter]``) cuts, for ``gemv_experts`` to run it as P more experts; 0 when
    it does not fit (other width, dtype or layout)."""
    inter, d_in, d_out = up.shape[1], up.shape[2], down.shape[1]
    width = shared_up.shape[0]
    if (width % inter or shared_up.shape != (width, d_in) or shared_down.shape != (d_out, width)
            or shared_up.dtype != up.dtype or shared_down.dtype != down.dtype
            or shared_up.stride(-1) != 1 or shared_down.stride(-1) != 1):
        return 0
    return width // inter


def gemv_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, up: torch.Tensor,
                 down: torch.Tensor, shared: Optional[torch.Tensor] = None,
                 shared_mlp: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 next_norm: Optional[tuple[torch.Tensor, float]] = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``sum_j weights[t, j] * expert_{idx[t, j]}(x[t]) (+ shared_expert(x[t])) (+ shared[t])``:
    three launches in all.

    ``idx`` may be the router's int64 ids as they are; ``shared`` (``[N, out]``, optional) is added
    in fp32 before the one rounding to ``x.dtype``, as in ``loop_experts``. ``shared_mlp``: the
    shared expert's ``(up [P * inter, in], down [out, P * inter])`` weights (relu2 between, no bias;
    ``shared_parts`` says whether they fit). It runs as P more experts of weight 1 per token, in the
    same two launches as the routed ones: at decode that saves the shared expert's own GEMVs, their
    split-K reductions and its activation kernel, and its weights stream at the expert GEMV's rate.
    Each part's output is rounded to ``x.dtype`` like a routed expert's before the fp32 sum.
    ``next_norm``: see ``combine_triton`` (then returns ``(out, rms_norm(out))``).
    """
    ntok, topk = idx.shape
    # The router's ids are contiguous, so this is a view (no launch); a strided [N, 1] slice is not.
    experts = idx.reshape(-1).contiguous()
    parts, shared_up, shared_down = 0, None, None
    if shared_mlp is not None:
        shared_up, shared_down = shared_mlp
        parts = shared_parts(up, down, shared_up, shared_down)
        if parts == 0:
            raise ValueError(f"the shared expert {tuple(shared_up.shape)} / {tuple(shared_down.shape)} does not cut "
                             f"into experts of {tuple(up.shape[1:])} / {tuple(down.shape[1:])}")
    # The up projection may start during the route kernel before it (its shared parts need no ids).
    sm90 = triton_moe.pdl_launch(x)
    pdl = SHARED_AHEAD and parts > 0 and sm90
    # And the down projection may load its first weight tiles while the up projection finishes.
    down_early = DOWN_EARLY and sm90
    h = _gemv(x.contiguous(), up, experts, row_div=topk, relu2=True, tokens=ntok,
              shared_w=shared_up, parts=parts, split_rows=True, pdl=pdl, trigger=down_early)  # [slots, inter]
    y = _gemv(h, down, experts, row_div=None, relu2=False, tokens=ntok,
              shared_w=shared_down, parts=parts, split_rows=False, wait_x=down_early)  # [slots, out], slot order
    return combine_triton(y, None, weights, shared, out_dtype=x.dtype, shared_parts=parts, next_norm=next_norm)
