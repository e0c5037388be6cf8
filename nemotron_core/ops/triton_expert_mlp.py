"""A decode step's experts as one kernel: up projection, relu2 and down projection together.

``triton_experts.gemv_experts`` runs the up projection and then the down projection as two kernels,
and the down one cannot finish before the up one has (each output needs every intermediate value of
its expert). Here the intermediate width is cut across programs instead: the program of (expert,
chunk c) computes intermediate values ``c * BLOCK_I ...`` of its expert (its up rows, relu2) and
multiplies them straight into the matching ``BLOCK_I`` columns of the down projection. relu2 works
element by element, so no program waits for another, and the expert weights of a MoE layer stream
in one pass with no kernel boundary inside it. The chunks' partial outputs, weighted by the router,
add up by atomics in an fp64 accumulator; the combine then adds the residual, rounds once, writes
the next block's normalised input (as ``combine_triton`` does) and zeroes the accumulator for the
next call.

Order: atomics add in whatever order the programs get there. The partials are fp32 and the sum is
fp64, so two orders differ by about 2^-45 of the sum, and the 16-bit output rounded from it is the
same unless the sum lies that close to a rounding boundary (about one element in 10^10): the output
is reproducible in practice, not by construction. Under ``torch.use_deterministic_algorithms(True)``
``gemv_experts`` keeps its two kernels, whose sums run in a fixed order.

Numerics against those two kernels: the intermediate is rounded to the input dtype as there, but an
expert's output is not rounded before the weighted sum (there it is stored in the input dtype), so
the result is at least as accurate and may differ in the last bit.

The accumulator is one buffer per (device, width), zeroed once and kept zero by the combine: calls
must not run concurrently on two streams, and a CUDA graph capture must follow an eager call (as
``generation.Decoder``'s warm-up does), which allocates it. The kernel also runs under Triton's
interpreter (CPU tests); the reference is ``experts.loop_experts``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import triton_experts, triton_moe

# Whether gemv_experts takes this kernel where it applies (``applies``): a switch for benchmarks.
ENABLED = True
# The GPU architectures (compute capability) where it was measured faster inside the model; elsewhere
# the two kernels run. INTERPRETED: whether Triton's interpreter takes it too (tests switch it on).
ARCHS = {(9, 0)}
INTERPRETED = False
# Intermediate values a program computes (its share of the up rows and of the down columns), the
# K tile of the up projection and the output tile of the down projection.
BLOCK_I = 64
BLOCK_K = 128
BLOCK_O = 128
NUM_WARPS = 4
# Tokens the accumulator holds: a decode step's (gemv_experts serves at most MAX_SLOTS slots).
MAX_TOKENS = triton_experts.MAX_SLOTS


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    triton_experts._kernel()  # defines the slot helpers below in triton_experts' namespace
    helpers = vars(triton_experts)
    _expert_of, _row_of, _weights_of = helpers["_expert_of"], helpers["_row_of"], helpers["_weights_of"]
    _dot_t = triton_moe.dot_t()

    @triton.jit
    def expert_mlp(x_ptr, up_ptr, down_ptr, sup_ptr, sdown_ptr, expert_ptr, gate_ptr, acc_ptr,
                   I, S, R, E, stride_xm, stride_ue, stride_un, stride_de, stride_dn, stride_sun, stride_sdn,
                   stride_acc, K: tl.constexpr, H: tl.constexpr, TOPK: tl.constexpr, PARTS: tl.constexpr,
                   BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr, S_P2: tl.constexpr,
                   MG: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
        # Slots as in triton_experts.expert_gemv: routed slot s < R is (token s // TOPK, its
        # (s % TOPK)-th expert); slots from R on are the shared expert's PARTS parts per token, each an
        # expert's width (ids E, E + 1, ...). The program of a group's first slot serves every slot of
        # that expert (its tokens share the weight tiles); the others return.
        # K and H (loop bounds) are constexprs: Triton 3.6's interpreter cannot loop to a runtime
        # bound on numpy >= 2.4.
        slot = tl.program_id(0)
        pid_i = tl.program_id(1)
        # PDL (launched right behind the route kernel, which lets it start at once): a routed slot's
        # program waits for the router's ids and weights; a shared part's needs neither, so it streams
        # its weights and waits only before its first atomic.
        if PDL:
            if slot < R:
                gdc_wait()
        e = _expert_of(slot, slot < S, expert_ptr, R, E, PARTS)
        offs_s = tl.arange(0, S_P2)
        ids = _expert_of(offs_s, (offs_s < S) & ((e < E) | (offs_s >= R)), expert_ptr, R, E, PARTS)
        same = (ids == e) & (offs_s < S)
        if tl.min(tl.where(same, offs_s, S_P2), axis=0) == slot:
            rank = tl.cumsum(same.to(tl.int32), axis=0) - 1
            offs_m = tl.arange(0, MG)
            pick = same[None, :] & (rank[None, :] == offs_m[:, None])
            member = tl.sum(tl.where(pick, offs_s[None, :], 0), axis=1)
            valid = offs_m < tl.sum(same.to(tl.int32), axis=0)
            token = _row_of(member, R, TOPK, PARTS, False).to(tl.int64)
            offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
            mask_i = offs_i < I
            # h = relu2(x @ up[e][chunk]^T), rounded to x's dtype as the two-kernel path stores it.
            up_base, up_row = _weights_of(e, up_ptr, sup_ptr, E, stride_ue, stride_un, stride_sun,
                                          I * stride_sun, PARTS)
            h = tl.zeros((MG, BLOCK_I), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                xs = tl.load(x_ptr + token[:, None] * stride_xm + offs_k[None, :],
                             mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)
                w = tl.load(up_base + offs_i[:, None] * up_row + offs_k[None, :],
                            mask=mask_i[:, None] & (offs_k[None, :] < K), other=0.0)
                h = _dot_t(xs, w, h, IEEE)
            h = tl.maximum(h, 0.0)
            h = (h * h).to(x_ptr.dtype.element_ty)
            # Each member's weight: the router's for a routed slot (weights [N, TOPK], contiguous, so
            # slot s is element s), 1 for the shared expert.
            routed = member < R
            gate = tl.load(gate_ptr + member, mask=valid & routed, other=1.0)
            if PDL:
                if slot >= R:
                    gdc_wait()  # (the accumulator's last user, the previous combine, is done)
            # The chunk's share of the output: h @ down[e][:, chunk]^T, BLOCK_O outputs at a time. The
            # shared expert's down matrix [H, PARTS * I] is cut along its columns.
            down_base, down_row = _weights_of(e, down_ptr, sdown_ptr, E, stride_de, stride_dn, stride_sdn, I, PARTS)
            # Every program adds into the same H outputs: each starts at another output tile and goes
            # round, so that the atomics of programs running side by side hit different addresses.
            N_O: tl.constexpr = (H + BLOCK_O - 1) // BLOCK_O
            start = (slot * 5 + pid_i) % N_O
            for oi in range(0, N_O):
                o0 = ((start + oi) % N_O) * BLOCK_O
                offs_o = o0 + tl.arange(0, BLOCK_O)
                mask_o = offs_o < H
                wd = tl.load(down_base + offs_o[:, None] * down_row + offs_i[None, :],
                             mask=mask_o[:, None] & mask_i[None, :], other=0.0)
                y = _dot_t(h, wd, tl.zeros((MG, BLOCK_O), dtype=tl.float32), IEEE)
                y = y * gate[:, None]
                tl.atomic_add(acc_ptr + token[:, None] * stride_acc + offs_o[None, :], y.to(tl.float64),
                              mask=valid[:, None] & mask_o[None, :], sem="relaxed")

    from triton.language.extra.cuda import gdc_wait

    globals().update(tl=tl, _dot_t=_dot_t, _expert_of=_expert_of, _row_of=_row_of, _weights_of=_weights_of,
                     gdc_wait=gdc_wait)  # the interpreter resolves names here
    return expert_mlp, triton.cdiv


@functools.lru_cache(maxsize=None)
def _accumulator(device: torch.device, width: int) -> torch.Tensor:
    # Zeroed once; each call's combine reads its rows and zeroes them again.
    return torch.zeros(MAX_TOKENS, width, dtype=torch.float64, device=device)


def applies(x: torch.Tensor, tokens: int, rows: int) -> bool:
    """Whether ``gemv_experts`` takes the one-kernel path for ``tokens`` tokens and ``rows`` slots
    (routed and shared parts): ``ENABLED``, no request for deterministic algorithms, a grouped tile
    that fits, and 16-bit inputs on a GPU architecture in ``ARCHS`` (or the interpreter, if
    ``INTERPRETED``). fp32 inputs keep the two kernels on the GPU: the fp64 sum rounds to fp32 with
    far more chances of a boundary case than to 16 bits (see the module docstring)."""
    if not ENABLED or torch.are_deterministic_algorithms_enabled() or tokens > MAX_TOKENS:
        return False
    if triton_moe._next_pow2(rows) * max(16, triton_moe._next_pow2(tokens)) > triton_experts.MAX_GROUP_TILE:
        return False
    if triton_moe.interpreting():
        return INTERPRETED and triton_moe.usable(x)
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and triton_moe.usable(x)
            and torch.cuda.get_device_capability(x.device) in ARCHS)


def expert_mlp(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, up: torch.Tensor,
               down: torch.Tensor, shared_up: Optional[torch.Tensor], shared_down: Optional[torch.Tensor],
               parts: int, residual: Optional[torch.Tensor] = None,
               next_norm: Optional[tuple[torch.Tensor, float]] = None, pdl: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """What ``gemv_experts`` returns, in two launches: this kernel and the combine.

    ``x [N, in]``; ``experts``: the router's ids flattened (``N * top_k``); ``weights [N, top_k]``
    (fp32); ``up [E, inter, in]``, ``down [E, out, inter]``; the shared expert's ``shared_up
    [parts * inter, in]`` and ``shared_down [out, parts * inter]`` (or None with ``parts`` 0);
    ``residual [N, out]``, added before the one rounding; ``next_norm = (g, eps)``: also return the
    next block's ``rms_norm`` of the output. ``pdl``: launched behind the route kernel under
    programmatic dependent launch (sm_90+), the shared expert's programs starting before the routing
    is known."""
    kernel, cdiv = _kernel()
    ntok, topk = weights.shape
    n_exp, inter, d_in = up.shape
    d_out = down.shape[1]
    routed = experts.shape[0]
    rows = routed + ntok * parts
    if ntok > MAX_TOKENS:
        raise ValueError(f"expert_mlp takes at most {MAX_TOKENS} tokens, got {ntok}")
    acc = _accumulator(x.device, d_out)
    gate = weights.contiguous()
    s_up = shared_up if shared_up is not None else up
    s_down = shared_down if shared_down is not None else down
    kernel[(rows, cdiv(inter, BLOCK_I))](
        x, up, down, s_up, s_down, experts, gate, acc, inter, rows, routed, n_exp,
        x.stride(0), up.stride(0), up.stride(1), down.stride(0), down.stride(1), s_up.stride(0), s_down.stride(0),
        acc.stride(0), K=d_in, H=d_out, TOPK=topk, PARTS=parts, BLOCK_I=BLOCK_I, BLOCK_K=BLOCK_K,
        BLOCK_O=BLOCK_O, S_P2=triton_moe._next_pow2(rows), MG=max(16, triton_moe._next_pow2(ntok)),
        IEEE=x.dtype == torch.float32, PDL=pdl, num_warps=NUM_WARPS, launch_pdl=pdl)
    return triton_moe.combine_summed(acc[:ntok], residual, x.dtype, next_norm)
