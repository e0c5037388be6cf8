"""Fused Triton kernels for the small steps of the MoE block: routing and the weighted combine.

Around the expert GEMMs, the torch version of the MoE block is a chain of tiny element-wise
kernels: sigmoid, bias add, top-k, gather, sum, divide and scale for the router, and for the
experts a gather back to token order, an fp32 ``y * w``, a sum over k and a cast. At decode
(batch 1, inside a CUDA graph) each costs a launch and a few microseconds, hundreds of times per
token; at prefill the fp32 ``[tokens * k, hidden]`` intermediates cost real memory traffic. Here
each of the two steps is one kernel:

* ``route_triton``: sigmoid, biased top-k choice, unbiased weights, normalisation and scaling, from
  the router logits (the ``x @ W^T`` GEMM stays with cuBLAS);
* ``combine_triton``: ``out[t] = sum_j w[t, j] * y[pos[t, j]] (+ shared[t])`` in fp32, rounded once.

Both also run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the
tests check them against the torch references. Kernels are built on first use, so importing this
module does not need triton.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

# The router kernel keeps a whole row of expert scores in registers and finds the top-k by k rounds
# of argmax: fine for the few hundred experts of the Nemotron-H configs, wasteful far beyond that.
MAX_EXPERTS = 512
MAX_TOP_K = 16


@functools.lru_cache(maxsize=None)
def have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Programmatic dependent launch (sm_90+): a kernel launched with it may start while the one before it
# still runs, once that one's programs have all called gdc_launch_dependents; it reads that kernel's
# results only after gdc_wait. A global switch, so a benchmark can measure with and without.
PDL = True
# Whether, under PDL, the route kernel is launched to start while the router's partial-logit kernel
# before it runs (which signals it at its start; route waits for it before reading): a switch for
# benchmarks.
ROUTE_PDL = True
# A decode step's rows: fewer than this many (``triton_router`` takes its partial-logit kernel below it).
DECODE_ROWS = 64
# Router rows per route-kernel program for at most DECODE_ROWS rows: 1 puts each token's top-k in its
# own one-warp program (8 programs at batch 8, against one of 4 warps); 0 packs ~1k scores a program
# as for a prompt. On the H200: 1,160.2 against 1,152.7 tok/s at batch 8, and 1,159.5 against
# 1,154.3 in a second A/B (``benchmarks/gpu_ab.py --switch route_rows``; the A/B's noise is ~0.1%).
DECODE_ROUTE_ROWS = 1


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> int:
    major, _ = torch.cuda.get_device_capability(device)
    return major


def pdl_launch(x: torch.Tensor) -> bool:
    """Whether kernels on ``x``'s device may use programmatic dependent launch (compiled Triton on an
    sm_90 or newer GPU, ``PDL`` on); also whether kernels should signal their dependents early."""
    return PDL and x.is_cuda and not interpreting() and _capability(x.device) >= 9


def interpreting() -> bool:
    """Whether Triton runs kernels in its (CPU, numpy) interpreter rather than compiling them."""
    if not have_triton():
        return False
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    import os

    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _library_interpreted() -> bool:
    """Whether triton.language's own jit helpers (``tl.zeros``, ``tl.sum``...) run in the interpreter.

    They are built once, when triton is first imported, and only for the interpreter if
    ``TRITON_INTERPRET`` was set by then. Setting it later (e.g. after ``import transformers``, which
    imports triton through torch._dynamo) makes new kernels interpreted but leaves the helpers they
    call compiled-only, and every kernel fails.
    """
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(getattr(tl, "zeros", None), InterpretedFunction)


def pinned_for(table: dict[tuple[int, int], dict], device: torch.device) -> dict | None:
    """``table``'s launch config for ``device``'s GPU architecture (compute capability): the configs a
    kernel pins per architecture instead of autotuning. None on the CPU, under the interpreter and for
    an architecture not in the table (the autotuner's pick then)."""
    if device.type != "cuda" or interpreting():
        return None
    return table.get(torch.cuda.get_device_capability(device))


def usable(t: torch.Tensor) -> bool:
    """Whether the kernels can run on tensors like ``t``: CUDA with triton, or CPU under the interpreter."""
    if interpreting():
        return _library_interpreted()
    return t.is_cuda and have_triton()


# Warps of a combine that also normalises (one program holds a whole row of the hidden size): on the
# H200 at batch 1, 2.4 us a call with 4 warps, 2.5 with 8, 3.0 with 16 (benchmarks/gpu_gemv_sweep.py).
NORM_WARPS = 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def dot_t():
    """The GEMV kernels' tile product ``acc + x @ w.T``, a Triton jit helper: fp32 inputs (``IEEE``) at
    full precision (tl.dot would take TF32 for them), 16-bit ones as they are (their products are exact
    in the fp32 accumulator)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _dot_t(x, w, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            return tl.dot(x, tl.trans(w), acc)

    if interpreting():
        # Triton 3.6's interpreter keeps bf16 tiles as their raw bits (uint16) and its tl.dot multiplies
        # those bits as integers: there 16-bit tiles go through fp32, the same products (exact in fp32).
        @triton.jit
        def _dot_t(x, w, acc, IEEE: tl.constexpr):  # noqa: F811
            return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")

    globals().update(tl=tl)  # (the interpreter resolves the helper's names here)
    return _dot_t


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def moe_route(logits_ptr, bias_ptr, idx_ptr, w_ptr, N, E, stride_p, stride_l, scaling,
                  TOPK: tl.constexpr, NORM: tl.constexpr, PRECISE: tl.constexpr, PARTS: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, WAIT: tl.constexpr,
                  TRIGGER: tl.constexpr):
        # WAIT: launched with PDL; the logits come from the kernel before. Only then TRIGGER: the
        # expert GEMV that then starts reads, before waiting, what that kernel wrote (the
        # normalised x), so this kernel's own wait must come first.
        if WAIT:
            gdc_wait()
        if TRIGGER:  # let the expert GEMV start its shared expert's part now (triton_experts)
            gdc_launch_dependents()
        offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        offs_e = tl.arange(0, BLOCK_E)
        offs_k = tl.arange(0, BLOCK_K)
        mask_t = offs_t < N
        valid_e = offs_e < E
        # The logits, or PARTS partial sums of them (over slices of K), added here in a fixed order.
        logit = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for p in tl.static_range(PARTS):
            logit += tl.load(logits_ptr + p * stride_p + offs_t[:, None] * stride_l + offs_e[None, :],
                             mask=mask_t[:, None] & valid_e[None, :], other=0.0).to(tl.float32)
        # torch computes sigmoid as 1 / (1 + expf(-x)) with an IEEE exp and divide; doing the same
        # (rather than tl.sigmoid's approximate ex2 and division) keeps the chosen experts identical
        # to the torch router's whenever two scores are within a few ulps. The interpreter has no
        # libdevice, and numpy's exp is accurate anyway.
        if PRECISE:
            e = libdevice.exp(-logit)
        else:
            e = tl.exp(-logit)
        score = tl.div_rn(tl.full(logit.shape, 1.0, tl.float32), 1.0 + e)
        bias = tl.load(bias_ptr + offs_e, mask=valid_e, other=0.0).to(tl.float32)
        choice = score + bias[None, :]
        # A NaN would never equal the row max, so no expert would be picked and an out-of-range id
        # would reach the expert kernels; as -inf it is simply the least preferred.
        choice = tl.where(choice == choice, choice, float("-inf"))
        free = tl.broadcast_to(valid_e[None, :], (BLOCK_T, BLOCK_E))
        ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
        ws = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        # Top-k as k rounds of argmax; ``free`` (not a -inf overwrite) marks what is left, so rows
        # whose remaining choices are all -inf still pick distinct, valid experts.
        for j in tl.static_range(TOPK):
            best = tl.max(tl.where(free, choice, float("-inf")), axis=1)
            hit = free & (choice == best[:, None])
            pick = tl.min(tl.where(hit, offs_e[None, :], BLOCK_E), axis=1)  # lowest id on ties
            sel = offs_e[None, :] == pick[:, None]
            w = tl.sum(tl.where(sel, score, 0.0), axis=1)  # the unbiased score of the pick
            ids = tl.where(offs_k[None, :] == j, pick[:, None], ids)
            ws = tl.where(offs_k[None, :] == j, w[:, None], ws)
            free = free & (~sel)
        if NORM:
            total = tl.sum(ws, axis=1)  # the slots past TOPK hold 0
            # div_rn: Triton's '/' is an approximate (2 ulp) division on NVIDIA; torch's is exact.
            ws = tl.div_rn(ws, tl.broadcast_to(total[:, None] + 1e-20, (BLOCK_T, BLOCK_K)))
        ws = ws * scaling
        out = offs_t[:, None] * TOPK + offs_k[None, :]
        mask_out = mask_t[:, None] & (offs_k[None, :] < TOPK)
        tl.store(idx_ptr + out, ids.to(tl.int64), mask=mask_out)
        tl.store(w_ptr + out, ws, mask=mask_out)

    @triton.jit
    def moe_combine(y_ptr, pos_ptr, w_ptr, shared_ptr, out_ptr, g_ptr, normed_ptr, N, H,
                    stride_y, stride_pt, stride_pk, stride_wt, stride_wk, stride_s, stride_o, stride_n, eps,
                    TOPK: tl.constexpr, IMPLICIT_POS: tl.constexpr, HAS_SHARED: tl.constexpr,
                    PARTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, NEXT_NORM: tl.constexpr,
                    TRIGGER: tl.constexpr):
        if TRIGGER:  # the next block's projection (a split-K GEMV launched with PDL) may start now
            gdc_launch_dependents()
        # int64 row indices: tokens * k * hidden passes 2**31 at long prefills.
        offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_t = offs_t < N
        mask = mask_t[:, None] & (offs_h[None, :] < H)
        acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        # Unrolled in j order: the same inputs always give the same bits (no atomics, no
        # order that depends on the launch).
        for j in tl.static_range(TOPK):
            if IMPLICIT_POS:
                row = offs_t * TOPK + j
            else:
                row = tl.load(pos_ptr + offs_t * stride_pt + j * stride_pk, mask=mask_t, other=0).to(tl.int64)
            w = tl.load(w_ptr + offs_t * stride_wt + j * stride_wk, mask=mask_t, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row[:, None] * stride_y + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += w[:, None] * y
        # Then, in slot order (IMPLICIT_POS), the shared expert's parts: rows N * TOPK + t * PARTS + p.
        for p in tl.static_range(PARTS):
            row = N * TOPK + offs_t * PARTS + p
            acc += tl.load(y_ptr + row[:, None] * stride_y + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SHARED:
            shared = tl.load(shared_ptr + offs_t[:, None] * stride_s + offs_h[None, :], mask=mask, other=0.0)
            acc += shared.to(tl.float32)
        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_t[:, None] * stride_o + offs_h[None, :], out, mask=mask)
        if NEXT_NORM:
            # The next block's RMSNorm of the rounded output, as its norm kernel would compute it
            # (the program holds whole rows: BLOCK_H >= H): one kernel fewer per MoE block at decode.
            out = out.to(tl.float32)  # (0 in the masked columns)
            rstd = 1 / tl.sqrt(tl.sum(out * out, axis=1) / H + eps)
            g = tl.load(g_ptr + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
            normed = out * rstd[:, None] * g[None, :]
            tl.store(normed_ptr + offs_t[:, None] * stride_n + offs_h[None, :],
                     normed.to(normed_ptr.dtype.element_ty), mask=mask)

    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    globals().update(gdc_launch_dependents=gdc_launch_dependents, gdc_wait=gdc_wait)  # (the interpreter's names)
    return moe_route, moe_combine, triton.cdiv


def route_triton(logits: torch.Tensor, bias: torch.Tensor, top_k: int, scaling: float,
                 norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n_group == 1`` router from its logits ``[N, E]`` (``x @ W^T``, pre-sigmoid), or from
    partial sums of them ``[P, N, E]`` (``triton_router.router_partials``), added in a fixed order.

    Returns expert ids (int64 ``[N, k]``, in descending order of ``sigmoid(logit) + bias``, the lower
    id first on ties) and their fp32 weights ``[N, k]``: ``sigmoid(logit)`` at those ids, normalised
    to sum 1 (``/ (sum + 1e-20)``) when ``norm_topk_prob``, times ``scaling``. The math of
    ``nemotron_core.modeling.moe.Router.forward``, in one launch.
    """
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, E] or [P, N, E], got {tuple(logits.shape)}")
    parts = logits if logits.dim() == 3 else logits[None]
    n, n_exp = logits.shape[-2:]
    if bias.shape != (n_exp,):
        raise ValueError(f"bias must be [{n_exp}], got {tuple(bias.shape)}")
    if not 1 <= top_k <= min(n_exp, MAX_TOP_K) or n_exp > MAX_EXPERTS:
        raise ValueError(f"route_triton supports top_k <= {MAX_TOP_K} of at most {MAX_EXPERTS} experts "
                         f"(got top_k={top_k}, {n_exp} experts)")
    idx = torch.empty(n, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(n, top_k, dtype=torch.float32, device=logits.device)
    if n == 0:
        return idx, weights
    if parts.stride(-1) != 1:
        parts = parts.contiguous()
    route, _, cdiv = _kernels()
    pdl = pdl_launch(logits)
    wait = ROUTE_PDL and pdl
    block_e = _next_pow2(n_exp)
    # A few tokens per program for small expert counts, so a program holds ~1k scores; a decode
    # step's rows DECODE_ROUTE_ROWS a program.
    block_t = min(_next_pow2(n), max(1, 1024 // block_e))
    if DECODE_ROUTE_ROWS and n <= DECODE_ROWS:
        block_t = min(block_t, DECODE_ROUTE_ROWS)
    route[(cdiv(n, block_t),)](
        parts, bias.contiguous(), idx, weights, n, n_exp, parts.stride(0), parts.stride(1), float(scaling),
        TOPK=top_k, NORM=bool(norm_topk_prob), PRECISE=not interpreting(), PARTS=parts.shape[0],
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=_next_pow2(top_k), WAIT=wait, TRIGGER=pdl,
        launch_pdl=wait,
        # One token's row (a batch-1 decode step) in one warp: its 3 * top_k reductions are then warp
        # shuffles, with no shared-memory round trips and barriers between the warps.
        num_warps=1 if block_t * block_e <= 512 else 4)
    return idx, weights


def combine_triton(y: torch.Tensor, pos: Optional[torch.Tensor], weights: torch.Tensor,
                   shared: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                   shared_parts: int = 0, next_norm: Optional[tuple[torch.Tensor, float]] = None
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``out[t] = sum_j weights[t, j] * y[pos[t, j]] (+ sum_p y[N * k + t * P + p]) (+ shared[t])``,
    accumulated in fp32, rounded once.

    ``y [M, H]``: expert outputs, one row per (token, expert) slot; ``pos [N, k]`` (any int dtype):
    the row of ``y`` holding token t's j-th expert output, or ``None`` for slot order
    (``pos[t, j] = t * k + j``, so no index tensor is needed); ``weights [N, k]``; ``shared [N, H]``:
    optional (the shared expert's output), added in fp32 before the single rounding to
    ``out_dtype`` (default ``y.dtype``). The sum over j runs in a fixed order: deterministic.
    ``next_norm = (g, eps)``: also return ``rms_norm(out, g, eps)`` (the next block's normalised
    input), as ``(out, normed)``; meant for a few rows (decode), whose programs then hold whole rows.
    """
    n, top_k = weights.shape
    h = y.shape[1]
    if pos is not None and pos.shape != weights.shape:
        raise ValueError(f"pos {tuple(pos.shape)} and weights {tuple(weights.shape)} differ")
    if shared_parts and pos is not None:
        raise ValueError("shared_parts needs slot-order y (pos=None)")
    if pos is None and y.shape[0] != n * (top_k + shared_parts):
        raise ValueError(f"slot-order y needs {n * (top_k + shared_parts)} rows, got {y.shape[0]}")
    if shared is not None and shared.shape != (n, h):
        raise ValueError(f"shared must be [{n}, {h}], got {tuple(shared.shape)}")
    out = torch.empty(n, h, dtype=out_dtype or y.dtype, device=y.device)
    normed = torch.empty_like(out) if next_norm is not None else None
    if next_norm is not None and (next_norm[0].shape != (h,) or next_norm[0].stride(0) != 1):
        raise ValueError(f"the norm weight must be contiguous [{h}], got {tuple(next_norm[0].shape)}")
    if n == 0 or h == 0:
        return out if normed is None else (out, normed)
    if y.stride(1) != 1:
        y = y.contiguous()
    if shared is not None and shared.stride(1) != 1:
        shared = shared.contiguous()
    _, combine, cdiv = _kernels()
    # ~4k fp32 accumulators per program (32 a thread at 4 warps); decode (N=1) gets one row of
    # 256-wide blocks, i.e. hidden / 256 programs.
    block_h = _next_pow2(h) if next_norm is not None else min(_next_pow2(h), 256)
    block_t = min(_next_pow2(n), max(1, 4096 // block_h))
    p = pos if pos is not None else weights  # never read when IMPLICIT_POS; any pointer will do
    s = shared if shared is not None else out
    g, eps = next_norm if next_norm is not None else (weights, 0.0)  # (g never read without NEXT_NORM)
    combine[(cdiv(n, block_t), cdiv(h, block_h))](
        y, p, weights, s, out, g, normed if normed is not None else out, n, h,
        y.stride(0), p.stride(0), p.stride(1), weights.stride(0), weights.stride(1), s.stride(0), out.stride(0),
        out.stride(0), float(eps),
        TOPK=top_k, IMPLICIT_POS=pos is None, HAS_SHARED=shared is not None, PARTS=shared_parts,
        BLOCK_T=block_t, BLOCK_H=block_h, NEXT_NORM=next_norm is not None, TRIGGER=pdl_launch(y),
        num_warps=NORM_WARPS if next_norm is not None else 4)
    return out if normed is None else (out, normed)
