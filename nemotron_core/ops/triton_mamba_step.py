"""A Mamba2 block's decode step between its two projections, as one Triton kernel.

At decode the Mamba block runs, between in_proj and out_proj: the causal conv's state update (ours,
``triton_conv``), mamba-ssm's selective state update, and mamba-ssm's gated RMSNorm: three launches
of a few microseconds each, every one bound by latency rather than bytes (the largest, the SSM state,
is 2 MB per layer on the Nano shape). Here one launch does all three:

* one program per (row, head, block of ``BLOCK_P`` head channels) convolves its x channels and its
  group's B and C channels (each program of a group recomputes the same B and C: 2 x state_size
  channels, cheaper than a second launch), updates its ``[BLOCK_P, N]`` slice of the fp32 SSM
  state, and computes ``y = C . state + D x``, gated by ``silu(z)``;
* it stores the gated values and their sum of squares, and counts itself done on its norm group's
  counter; the last program of the group (an atomic counter, which that program resets) adds the
  sums in a fixed order (deterministic), normalises the group and writes the output. Only that
  program shifts the group's B/C conv state, after every program of the group has read it.

Under programmatic dependent launch (sm_90) the kernel starts while in_proj's GEMV still runs: it
loads its SSM state slice and the head's parameters, then waits for the GEMV, and stores nothing
before that; it also lets out_proj's GEMV start loading its weights at once.

Rounding follows the path it replaces: conv outputs round to the input dtype, the SSM state keeps its
dtype, ``y`` rounds to the input dtype before the gate, the norm is in fp32 and rounds once.
``mamba_step_reference`` is the plain-PyTorch definition (the tests' reference); the kernel also runs
under Triton's interpreter (CPU tests).
"""
from __future__ import annotations

import functools

import torch

from .conv import causal_conv1d_step
from .norms import gated_rms_norm
from .ssd import ssd_step
from .triton_moe import _next_pow2, pdl_launch, usable

# When the model's decode step takes this kernel (modeling/mamba2.py; ``default_on``): None (the
# default) where mamba-ssm's kernels are absent, so that the step would otherwise run the reference
# ops (a dozen launches), and at batch 1 where programmatic dependent launch is available, because
# then this kernel lets out_proj's GEMV load its weights while it runs (mamba-ssm's kernels do not);
# True always; False never. Alone, mamba-ssm's two kernels plus our conv took as long on the H200
# (5.98 against 5.76 us a layer at batch 1, 14.00 against 14.44 at batch 8).
ENABLED: bool | None = None
# Under PDL: launched to start while in_proj's GEMV still runs (it signals at its start), loading the
# SSM state before waiting for it. A switch for benchmarks.
EARLY = True
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_GROUPS = 1 << 16  # (row, norm group) counters per device


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _conv(zx_ptr, st_ptr, w_ptr, b_ptr, offs_c, stride_sc, stride_sk, stride_wc, stride_wk,
              K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr):
        """silu(conv) over channels ``offs_c`` (rounded like the conv kernel's output), and the
        shifted window (the state's next contents, ``[C, KP]``, columns < K-1 meaningful)."""
        k = tl.arange(0, KP)
        x_new = tl.load(zx_ptr + offs_c).to(st_ptr.dtype.element_ty)  # the state keeps its dtype
        old = tl.load(st_ptr + offs_c[:, None] * stride_sc + k[None, :] * stride_sk,
                      mask=k[None, :] < K - 1, other=0.0)
        window = tl.where(k[None, :] == K - 1, x_new[:, None], old)  # oldest first, x last
        w = tl.load(w_ptr + offs_c[:, None] * stride_wc + k[None, :] * stride_wk, mask=k[None, :] < K,
                    other=0.0).to(tl.float32)
        acc = tl.sum(window.to(tl.float32) * w, axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_c).to(tl.float32)
        y = (acc * tl.sigmoid(acc)).to(zx_ptr.dtype.element_ty).to(tl.float32)
        nxt = tl.load(st_ptr + offs_c[:, None] * stride_sc + (k[None, :] + 1) * stride_sk,
                      mask=k[None, :] + 1 < K - 1, other=0.0)
        shifted = tl.where(k[None, :] + 1 == K - 1, x_new[:, None], nxt)
        return y, shifted

    @triton.jit
    def mamba_step(zx_ptr, cst_ptr, cw_ptr, cb_ptr, sst_ptr, A_ptr, D_ptr, dtb_ptr, nw_ptr, out_ptr,
                   gated_ptr, sq_ptr, count_ptr, dt_min, dt_max, eps,
                   stride_zb, stride_cb, stride_cc, stride_ck, stride_wc, stride_wk,
                   stride_sb, stride_sh, stride_sp, stride_sn, stride_ob,
                   H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                   KP: tl.constexpr, BLOCK_P: tl.constexpr, HAS_BIAS: tl.constexpr, TRIGGER: tl.constexpr,
                   WAIT: tl.constexpr):
        if TRIGGER:  # let the next kernel (out_proj's GEMV) start loading its weights now
            gdc_launch_dependents()
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1) // (P // BLOCK_P)
        pb = tl.program_id(1) % (P // BLOCK_P)
        g = h // (H // G)
        DI: tl.constexpr = H * P  # d_inner: z is zx[0:DI], then x, B, C (the conv channels), then dt
        zx = zx_ptr + b * stride_zb
        cst = cst_ptr + b * stride_cb
        offs_p = h * P + pb * BLOCK_P + tl.arange(0, BLOCK_P)  # this program's x (and z, y) channels
        offs_b = DI + g * N + tl.arange(0, N)  # its group's B channels (conv channel numbering)
        offs_n = tl.arange(0, N)
        # What the kernel before (in_proj's GEMV) does not write comes first: the SSM state slice (the
        # largest read) and the head's parameters. WAIT (launched with PDL behind that GEMV, which
        # signals at its start): only then wait for it. Every store comes after the wait (an output
        # may reuse memory that the GEMV still reads).
        st = (sst_ptr + b * stride_sb + h * stride_sh + (offs_p - h * P)[:, None] * stride_sp
              + offs_n[None, :] * stride_sn)
        old_state = tl.load(st).to(tl.float32)
        a_h = tl.load(A_ptr + h).to(tl.float32)
        d_h = tl.load(D_ptr + h).to(tl.float32)
        dt_bias = tl.load(dtb_ptr + h).to(tl.float32)
        if WAIT:
            gdc_wait()
        x, x_state = _conv(zx + DI, cst, cw_ptr, cb_ptr, offs_p, stride_cc, stride_ck, stride_wc, stride_wk,
                           K, KP, HAS_BIAS)
        B, b_state = _conv(zx + DI, cst, cw_ptr, cb_ptr, offs_b, stride_cc, stride_ck, stride_wc, stride_wk,
                           K, KP, HAS_BIAS)
        C, c_state = _conv(zx + DI, cst, cw_ptr, cb_ptr, offs_b + G * N, stride_cc, stride_ck, stride_wc,
                           stride_wk, K, KP, HAS_BIAS)
        k = tl.arange(0, KP)
        tl.store(cst + offs_p[:, None] * stride_cc + k[None, :] * stride_ck, x_state, mask=k[None, :] < K - 1)

        # dt = softplus(dt + dt_bias) (torch's threshold of 20), clamped to dt_limit.
        dt = tl.load(zx + DI + DI + 2 * G * N + h).to(tl.float32) + dt_bias
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
        dA = tl.exp(dt * a_h)
        state = old_state * dA + (dt * x)[:, None] * B[None, :]
        tl.store(st, state.to(sst_ptr.dtype.element_ty))
        y = tl.sum(state * C[None, :], axis=1) + d_h * x
        y = y.to(zx_ptr.dtype.element_ty).to(tl.float32)  # the state update's output dtype
        z = tl.load(zx + offs_p).to(tl.float32)
        gated = y * (z * tl.sigmoid(z))
        tl.store(gated_ptr + b * DI + offs_p, gated)
        # This program's sum of squares, then: is every program of this norm group done?
        PER_GROUP: tl.constexpr = (H // G) * (P // BLOCK_P)
        tl.store(sq_ptr + b * H * (P // BLOCK_P) + tl.program_id(1), tl.sum(gated * gated, axis=0))
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + b * G + g, 1, sem="acq_rel")
        if done == PER_GROUP - 1:
            first = g * PER_GROUP
            total = tl.sum(tl.load(sq_ptr + b * H * (P // BLOCK_P) + first + tl.arange(0, PER_GROUP),
                                   cache_modifier=".cg"), axis=0)  # a fixed order: the same bits every time
            GS: tl.constexpr = DI // G
            rstd = 1.0 / tl.sqrt(total / GS + eps)
            offs_g = g * GS + tl.arange(0, GS)
            vals = tl.load(gated_ptr + b * DI + offs_g, cache_modifier=".cg")
            w = tl.load(nw_ptr + offs_g).to(tl.float32)
            tl.store(out_ptr + b * stride_ob + offs_g, (vals * rstd * w).to(out_ptr.dtype.element_ty))
            # Every program of the group has read the old B/C conv state: shift it now.
            tl.store(cst + offs_b[:, None] * stride_cc + k[None, :] * stride_ck, b_state, mask=k[None, :] < K - 1)
            tl.store(cst + (offs_b + G * N)[:, None] * stride_cc + k[None, :] * stride_ck, c_state,
                     mask=k[None, :] < K - 1)
            tl.atomic_xchg(count_ptr + b * G + g, 0)  # ready for the next call

    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    globals().update(tl=tl, _conv=_conv, gdc_launch_dependents=gdc_launch_dependents,
                     gdc_wait=gdc_wait)  # (the interpreter's names)
    return mamba_step


@functools.lru_cache(maxsize=None)
def _counters(device: torch.device) -> torch.Tensor:
    # Zeroed once; each call's last program per (row, group) puts its counter back to 0.
    return torch.zeros(_MAX_GROUPS, dtype=torch.int32, device=device)


def default_on(zxbcdt: torch.Tensor, have_mamba_ssm: bool) -> bool:
    """Whether the decode step takes this kernel when ``ENABLED`` is None (see there)."""
    return not have_mamba_ssm or (zxbcdt.shape[0] == 1 and pdl_launch(zxbcdt))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported(zxbcdt: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, conv_weight: torch.Tensor,
              n_groups: int) -> bool:
    """Whether ``mamba_step`` takes these: ``zxbcdt [B, 2 * d_inner + 2 * groups * state + heads]`` rows
    with unit stride, power-of-two head dim (at least 16), state size, heads per group and group size,
    a conv of 2 to 4 taps, and few enough (row, group) pairs."""
    bsz, heads, p, n = ssm_state.shape
    k = conv_weight.shape[-1]
    d_inner = heads * p
    return (zxbcdt.dim() == 2 and zxbcdt.stride(-1) == 1 and zxbcdt.dtype in _DTYPES and usable(zxbcdt)
            and zxbcdt.shape == (bsz, 2 * d_inner + 2 * n_groups * n + heads)
            and conv_state.shape == (bsz, d_inner + 2 * n_groups * n, k - 1) and 2 <= k <= 4
            and heads % n_groups == 0 and _pow2(p) and _pow2(n) and _pow2(d_inner // n_groups)
            and _pow2(heads // n_groups) and bsz * n_groups <= _MAX_GROUPS and p >= 16)


def mamba_step(zxbcdt: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor,
               conv_bias: torch.Tensor | None, ssm_state: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
               dt_bias: torch.Tensor, dt_limit: tuple[float, float], norm_weight: torch.Tensor, eps: float,
               n_groups: int, block_p: int | None = None) -> torch.Tensor:
    """One decode step of a Mamba2 block from in_proj's output ``zxbcdt [B, d_in_proj]`` to out_proj's
    input ``[B, d_inner]`` (x's dtype): conv state update + SiLU, SSM state update with D skip, gated
    grouped RMSNorm. ``conv_state [B, conv_dim, K-1]`` and ``ssm_state [B, H, P, N]`` are updated in
    place. ``conv_weight [conv_dim, K]``; ``A = -exp(A_log)``."""
    if not supported(zxbcdt, conv_state, ssm_state, conv_weight, n_groups):
        raise ValueError("mamba_step does not take these shapes (see supported())")
    bsz, heads, p, n = ssm_state.shape
    d_inner = heads * p
    k = conv_weight.shape[-1]
    out = torch.empty(bsz, d_inner, dtype=zxbcdt.dtype, device=zxbcdt.device)
    # Half a head per program at batch 1 (128 programs on the Nano shape, for the SMs' sake; a quarter
    # head, 256 programs, measured 0.35% slower in the model on the H200).
    block_p = block_p or (p // 2 if bsz == 1 and p >= 32 else p)
    gated = torch.empty(bsz, d_inner, dtype=torch.float32, device=zxbcdt.device)
    sq = torch.empty(bsz, heads * (p // block_p), dtype=torch.float32, device=zxbcdt.device)
    kernel = _kernel()
    pdl = pdl_launch(zxbcdt)
    wait = EARLY and pdl
    kernel[(bsz, heads * (p // block_p))](
        zxbcdt, conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight, ssm_state, A, D,
        dt_bias, norm_weight, out, gated, sq, _counters(zxbcdt.device), float(dt_limit[0]), float(dt_limit[1]),
        float(eps), zxbcdt.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        conv_weight.stride(0), conv_weight.stride(1), ssm_state.stride(0), ssm_state.stride(1),
        ssm_state.stride(2), ssm_state.stride(3), out.stride(0),
        H=heads, G=n_groups, P=p, N=n, K=k, KP=_next_pow2(k), BLOCK_P=block_p, HAS_BIAS=conv_bias is not None,
        TRIGGER=pdl, WAIT=wait, launch_pdl=wait, num_warps=4)
    return out


def mamba_step_reference(zxbcdt: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor,
                         conv_bias: torch.Tensor | None, ssm_state: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
                         dt_bias: torch.Tensor, dt_limit: tuple[float, float], norm_weight: torch.Tensor, eps: float,
                         n_groups: int) -> torch.Tensor:
    """What ``mamba_step`` computes, from the reference ops (y rounded to x's dtype before the gate)."""
    bsz, heads, p, n = ssm_state.shape
    d_inner = heads * p
    z, xbc, dt = zxbcdt.split([d_inner, d_inner + 2 * n_groups * n, heads], dim=-1)
    xbc = causal_conv1d_step(xbc, conv_state, conv_weight, conv_bias)
    x, B, C = xbc.split([d_inner, n_groups * n, n_groups * n], dim=-1)
    y = ssd_step(ssm_state, x.view(bsz, heads, p), dt, A, B.view(bsz, n_groups, n), C.view(bsz, n_groups, n), D,
                 dt_bias, dt_limit)
    y = y.reshape(bsz, d_inner).to(zxbcdt.dtype)
    return gated_rms_norm(y, z, norm_weight, d_inner // n_groups, eps)
