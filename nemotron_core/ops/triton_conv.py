"""Mamba2's depthwise causal conv1d (+SiLU) as Triton kernels working in the ``[B, S, C]`` layout.

Why: the reference (``nemotron_core.ops.conv``, which defines the exact semantics, packed-document
masking included) transposes ``[B, S, C] -> [B, C, S]`` and calls ``F.conv1d``, whose depthwise
cuDNN kernel is slow for this shape (~1 ms forward and ~1.9 ms backward per layer at S=8192,
C=6144 bf16 on an H200, transposes and casts included). The conv is tiny arithmetic over a big
tensor, so it should run at memory speed: read x once, write the output once. Here (same H200):
forward ~62 us (3.2 TB/s against a 3.8 TB/s copy), backward ~105-130 us plus ~15 us of partial-sum
reduction.

How: every program owns ``BLOCK_C`` contiguous channels and ``BLOCK_S`` consecutive positions of one
sequence. It walks its positions one row at a time in a fully unrolled loop, keeping the previous
K-1 input rows in registers, so each input row is read from memory once (plus a K-1 row halo per
program); the channel dimension is contiguous, so every row load is coalesced. Results are stored
only after the block's last load, so all of its loads can be in flight together. Taps that fall
before position 0 read ``initial_state`` (the cached context); with ``seq_idx`` a tap that crosses
a document boundary contributes zero, and the cached context belongs to the first document.

The backward walks the positions downwards, recomputing the pre-activation from x (nothing but
the inputs is saved), over a few blocks per program, and produces dx plus per-program fp32 partial
sums of dweight/dbias that are reduced with ``.sum(0)``: deterministic, no atomics.

Decode uses a single-launch update kernel that also shifts the conv state in place (it runs inside
a CUDA graph, where every extra launch costs).

Kernels are built lazily, so importing this module does not need Triton.
"""
from __future__ import annotations

import functools
import os

import torch

# Largest conv width the kernels support: they keep K-1 <= 3 previous rows in registers.
MAX_K = 4
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _load_pos(x_base, state_base, p, S, stride_xs, stride_sk, cmask,
                  K: tl.constexpr, HAS_STATE: tl.constexpr):
        """Input row at position ``p`` as fp32: x for 0 <= p < S, the cached initial_state column
        K-1+p for -(K-1) <= p < 0, zero elsewhere (no state, or past the sequence end)."""
        in_x = (p >= 0) & (p < S)
        row = tl.minimum(tl.maximum(p, 0), tl.maximum(S - 1, 0)).to(tl.int64)
        v = tl.load(x_base + row * stride_xs, mask=cmask & in_x, other=0.0).to(tl.float32)
        if HAS_STATE:
            in_state = (p < 0) & (p >= 1 - K)
            col = tl.minimum(tl.maximum(p + K - 1, 0), K - 2)
            v += tl.load(state_base + col * stride_sk, mask=cmask & in_state, other=0.0).to(tl.float32)
        return v

    @triton.jit
    def _seq_at(seq_base, p, S, stride_qs):
        """Document id of position ``p``; positions before 0 (the cached context) belong to the first
        document. Rows past the end get the last id (their values are zero/unstored anyway)."""
        row = tl.minimum(tl.maximum(p, 0), tl.maximum(S - 1, 0)).to(tl.int64)
        return tl.load(seq_base + row * stride_qs, mask=S > 0, other=0)

    @triton.jit
    def _lag_weight(w_ptr, offs_c, stride_wc, stride_wk, cmask, LAG: tl.constexpr, K: tl.constexpr):
        """fp32 weight applied to the input LAG positions back (weight column K-1-LAG); zero for
        LAG >= K, so the kernels can always use four lags whatever K is."""
        if LAG < K:
            return tl.load(w_ptr + offs_c * stride_wc + (K - 1 - LAG) * stride_wk, mask=cmask,
                           other=0.0).to(tl.float32)
        else:
            return tl.zeros(offs_c.shape, dtype=tl.float32)

    @triton.jit
    def _bias(b_ptr, offs_c, cmask, HAS_BIAS: tl.constexpr):
        if HAS_BIAS:
            return tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
        else:
            return tl.zeros(offs_c.shape, dtype=tl.float32)

    @triton.jit
    def _sigmoid(x, FAST: tl.constexpr):
        if FAST:
            # 1 / (1 + 2^(-x log2 e)) with the hardware's approximate ex2 and rcp (a few ulp, far
            # inside fp32 tolerances): the kernels are close to instruction-bound, and tl.sigmoid
            # adds range fix-ups around both. +-inf come out right (0 and 1).
            e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * -1.4426950408889634],
                                          dtype=tl.float32, is_pure=True, pack=1)
            return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:  # the CPU interpreter cannot run PTX
            return tl.sigmoid(x)

    @triton.jit(do_not_specialize=["S"])
    def conv_fwd(x_ptr, w_ptr, b_ptr, seq_ptr, init_ptr, out_ptr, final_ptr, S, C,
                 stride_xb, stride_xs, stride_wc, stride_wk, stride_qb, stride_qs,
                 stride_ib, stride_ic, stride_ik, stride_ob, stride_os, stride_fb, stride_fc, stride_fk,
                 K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_STATE: tl.constexpr,
                 FAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        # Windows are named by lag: x1 is the input one row before the current row t, and so on.
        # Always four lags; for K < 4 the extra lags have zero weight.
        pid_s = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        x_base = x_ptr + b * stride_xb + offs_c
        st_base = init_ptr + b * stride_ib + offs_c * stride_ic
        q_base = seq_ptr + b * stride_qb
        bias = _bias(b_ptr, offs_c, cmask, HAS_BIAS)
        w0 = _lag_weight(w_ptr, offs_c, stride_wc, stride_wk, cmask, 0, K)
        w1 = _lag_weight(w_ptr, offs_c, stride_wc, stride_wk, cmask, 1, K)
        w2 = _lag_weight(w_ptr, offs_c, stride_wc, stride_wk, cmask, 2, K)
        w3 = _lag_weight(w_ptr, offs_c, stride_wc, stride_wk, cmask, 3, K)

        t0 = pid_s * BLOCK_S
        # Halo: the rows before this block (x of the previous block, or the cached state).
        x1 = _load_pos(x_base, st_base, t0 - 1, S, stride_xs, stride_ik, cmask, K, HAS_STATE)
        x2 = _load_pos(x_base, st_base, t0 - 2, S, stride_xs, stride_ik, cmask, K, HAS_STATE)
        x3 = _load_pos(x_base, st_base, t0 - 3, S, stride_xs, stride_ik, cmask, K, HAS_STATE)
        if HAS_SEQ:
            q1 = _seq_at(q_base, t0 - 1, S, stride_qs)
            q2 = _seq_at(q_base, t0 - 2, S, stride_qs)
            q3 = _seq_at(q_base, t0 - 3, S, stride_qs)

        # Unrolled: sliding the window is free register renaming. Outputs are kept (in a tuple) and
        # stored only after the last load: the compiler cannot know `out` doesn't alias x, so a
        # store between two loads would pin their order and leave one row load in flight at a time.
        ys = ()
        for i in tl.static_range(BLOCK_S):
            t = t0 + i
            x0 = _load_pos(x_base, st_base, t, S, stride_xs, stride_ik, cmask, K, HAS_STATE)
            if HAS_SEQ:
                # A tap reading another document contributes zero.
                q0 = _seq_at(q_base, t, S, stride_qs)
                acc = (bias + w0 * x0 + w1 * tl.where(q1 == q0, x1, 0.0) + w2 * tl.where(q2 == q0, x2, 0.0)
                       + w3 * tl.where(q3 == q0, x3, 0.0))
                q3, q2, q1 = q2, q1, q0
            else:
                acc = bias + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3
            ys = ys + ((acc * _sigmoid(acc, FAST)).to(out_ptr.dtype.element_ty),)
            x3, x2, x1 = x2, x1, x0

        # Final state = the last K-1 inputs (reaching into initial_state when S < K-1); only the
        # program holding the sequence end writes it.
        is_last = pid_s == tl.num_programs(0) - 1
        finals = ()
        for k in tl.static_range(K - 1):
            finals = finals + (_load_pos(x_base, st_base, S - (K - 1) + k, S, stride_xs, stride_ik,
                                         cmask & is_last, K, HAS_STATE),)
        for k in tl.static_range(K - 1):
            tl.store(final_ptr + b * stride_fb + offs_c * stride_fc + k * stride_fk,
                     finals[k].to(final_ptr.dtype.element_ty), mask=cmask & is_last)
        out_base = out_ptr + b * stride_ob + offs_c
        for i in tl.static_range(BLOCK_S):
            t = t0 + i
            tl.store(out_base + t.to(tl.int64) * stride_os, ys[i], mask=cmask & (t < S))

    @triton.jit
    def _bwd_row(x_base, st_base, q_base, g_base, u, S, stride_xs, stride_ik, stride_qs, stride_gs, cmask,
                 x1, x2, x3, q1, q2, q3, g1, g2, g3, r1, r2, r3, w0, w1, w2, w3, bias,
                 K: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_STATE: tl.constexpr, FAST: tl.constexpr):
        """One step of the backward's downward walk, at row u.

        In: the x window (x1..x3 = inputs at u, u-1, u-2, i.e. lags 1..3 of row u+1) with their
        document ids q1..q3, and dpre (g1..g3) and document ids (r1..r3) of rows u+1..u+3.
        Out: x window of row u (x0 = x[u], x1..x3 = lags 1..3), masked taps m1..m3 (for dweight),
        dpre[u] and dx[u]."""
        x0, x1, x2 = x1, x2, x3
        x3 = _load_pos(x_base, st_base, u - 3, S, stride_xs, stride_ik, cmask, K, HAS_STATE)
        if HAS_SEQ:  # taps masked at document boundaries, exactly as in the forward
            q0, q1, q2 = q1, q2, q3
            q3 = _seq_at(q_base, u - 3, S, stride_qs)
            m1 = tl.where(q1 == q0, x1, 0.0)
            m2 = tl.where(q2 == q0, x2, 0.0)
            m3 = tl.where(q3 == q0, x3, 0.0)
        else:
            q0 = q1
            m1, m2, m3 = x1, x2, x3
        pre = bias + w0 * x0 + w1 * m1 + w2 * m2 + w3 * m3
        # d silu(p)/dp = s (1 + p (1 - s)), s = sigmoid(p); dout reads zero past the end.
        sig = _sigmoid(pre, FAST)
        g = tl.load(g_base + u.to(tl.int64) * stride_gs, mask=cmask & (u < S), other=0.0).to(tl.float32)
        g0 = g * sig * (1.0 + pre * (1.0 - sig))
        # x[u] fed output u+L through lag L, unless u+L is in another document.
        if HAS_SEQ:
            dx = (w0 * g0 + w1 * tl.where(r1 == q0, g1, 0.0) + w2 * tl.where(r2 == q0, g2, 0.0)
                  + w3 * tl.where(r3 == q0, g3, 0.0))
        else:
            dx = w0 * g0 + w1 * g1 + w2 * g2 + w3 * g3
        return x0, x1, x2, x3, q0, q1, q2, q3, m1, m2, m3, g0, dx

    @triton.jit(do_not_specialize=["S"])
    def conv_bwd(x_ptr, w_ptr, b_ptr, seq_ptr, init_ptr, dout_ptr, dx_ptr, dw_part_ptr, db_part_ptr, S, C,
                 stride_xb, stride_xs, stride_wc, stride_wk, stride_qb, stride_qs,
                 stride_ib, stride_ic, stride_ik, stride_gb, stride_gs, stride_dxb, stride_dxs,
                 K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_STATE: tl.constexpr,
                 FAST: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        # Each program owns CHUNKS blocks of BLOCK_S rows and walks them downwards (dx[t] needs
        # dpre at t..t+K-1, which the walk has just computed), carrying the windows from block to
        # block and summing dweight/dbias in registers.
        pid_s = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        x_base = x_ptr + b * stride_xb + offs_c
        st_base = init_ptr + b * stride_ib + offs_c * stride_ic
        q_base = seq_ptr + b * stride_qb
        g_base = dout_ptr + b * stride_gb + offs_c
        dx_base = dx_ptr + b * stride_dxb + offs_c
        bias = _bias(b_ptr, offs_c, cmask, HAS_BIAS)
        w0 = _lag_weight(w_ptr, offs_c, stride_wc, stride_wk, cmask, 0, K)
        w1 = _lag_weight(w_ptr, offs_c, stride_wc, stride_wk, cmask, 1, K)
        w2 = _lag_weight(w_ptr, offs_c, stride_wc, stride_wk, cmask, 2, K)
        w3 = _lag_weight(w_ptr, offs_c, stride_wc, stride_wk, cmask, 3, K)

        t_end = (pid_s + 1) * CHUNKS * BLOCK_S  # one past this program's last row
        # The walk starts K-1 rows above the range: their dpre (owned by the next program, which
        # computes them too) feed dx of the top rows. Before the first step the x window holds
        # x[top], x[top-1], x[top-2] as lags 1..3 of row top+1; nothing above top is needed.
        top = t_end + K - 2
        x1 = _load_pos(x_base, st_base, top, S, stride_xs, stride_ik, cmask, K, HAS_STATE)
        x2 = _load_pos(x_base, st_base, top - 1, S, stride_xs, stride_ik, cmask, K, HAS_STATE)
        x3 = _load_pos(x_base, st_base, top - 2, S, stride_xs, stride_ik, cmask, K, HAS_STATE)
        g1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        g2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        g3 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        if HAS_SEQ:
            q1 = _seq_at(q_base, top, S, stride_qs)
            q2 = _seq_at(q_base, top - 1, S, stride_qs)
            q3 = _seq_at(q_base, top - 2, S, stride_qs)
        else:  # unused placeholders
            q1 = 0
            q2 = 0
            q3 = 0
        r1 = q1
        r2 = q1
        r3 = q1
        for i in tl.static_range(K - 1):  # the halo rows: dpre only
            x0, x1, x2, x3, q0, q1, q2, q3, m1, m2, m3, g0, dx = _bwd_row(
                x_base, st_base, q_base, g_base, top - i, S, stride_xs, stride_ik, stride_qs, stride_gs, cmask,
                x1, x2, x3, q1, q2, q3, g1, g2, g3, r1, r2, r3, w0, w1, w2, w3, bias, K, HAS_SEQ, HAS_STATE, FAST)
            g3, g2, g1 = g2, g1, g0
            r3, r2, r1 = r2, r1, q0

        dw0 = tl.zeros((BLOCK_C,), dtype=tl.float32)  # dweight by lag, and dbias
        dw1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dw2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dw3 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dbias = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for c in range(CHUNKS):  # a loop, not unrolled
            c_top = t_end - 1 - c * BLOCK_S
            # dx rows are kept and stored after the block's last load: the compiler cannot know dx
            # doesn't alias x or dout, so interleaved stores would serialise the loads.
            dxs = ()
            for i in tl.static_range(BLOCK_S):
                x0, x1, x2, x3, q0, q1, q2, q3, m1, m2, m3, g0, dx = _bwd_row(
                    x_base, st_base, q_base, g_base, c_top - i, S, stride_xs, stride_ik, stride_qs, stride_gs,
                    cmask, x1, x2, x3, q1, q2, q3, g1, g2, g3, r1, r2, r3, w0, w1, w2, w3, bias,
                    K, HAS_SEQ, HAS_STATE, FAST)
                dxs = dxs + (dx.to(dx_ptr.dtype.element_ty),)
                dbias += g0
                dw0 += g0 * x0
                dw1 += g0 * m1
                dw2 += g0 * m2
                dw3 += g0 * m3
                g3, g2, g1 = g2, g1, g0
                r3, r2, r1 = r2, r1, q0
            for i in tl.static_range(BLOCK_S):
                u = c_top - i
                tl.store(dx_base + u.to(tl.int64) * stride_dxs, dxs[i], mask=cmask & (u < S))

        # This program's partial sums, laid out [program, K, C] (channels contiguous); the host
        # reduces over programs, so the result does not depend on scheduling. Column j is lag K-1-j.
        part = b * tl.num_programs(0) + pid_s
        wp = dw_part_ptr + part * (K * C) + offs_c
        tl.store(wp + (K - 1) * C, dw0, mask=cmask)
        tl.store(wp + (K - 2) * C, dw1, mask=cmask)
        if K > 2:
            tl.store(wp + (K - 3) * C, dw2, mask=cmask)
        if K > 3:
            tl.store(wp + (K - 4) * C, dw3, mask=cmask)
        if HAS_BIAS:
            tl.store(db_part_ptr + part * C + offs_c, dbias, mask=cmask)

    @triton.jit
    def conv_update(x_ptr, state_ptr, w_ptr, b_ptr, out_ptr, C,
                    stride_xb, stride_sb, stride_sc, stride_sk, stride_wc, stride_wk, stride_ob,
                    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        st = state_ptr + b * stride_sb + offs_c * stride_sc
        # The state stores inputs in its own dtype; round x the same way the next step will see it.
        xs = tl.load(x_ptr + b * stride_xb + offs_c, mask=cmask, other=0.0).to(state_ptr.dtype.element_ty)
        acc = _bias(b_ptr, offs_c, cmask, HAS_BIAS)
        acc += _lag_weight(w_ptr, offs_c, stride_wc, stride_wk, cmask, 0, K) * xs.to(tl.float32)
        # Window slot k (oldest first) is state column k; read all before shifting left in place.
        s0 = tl.load(st, mask=cmask, other=0.0)
        acc += _lag_weight(w_ptr, offs_c, stride_wc, stride_wk, cmask, K - 1, K) * s0.to(tl.float32)
        if K > 2:
            s1 = tl.load(st + stride_sk, mask=cmask, other=0.0)
            acc += _lag_weight(w_ptr, offs_c, stride_wc, stride_wk, cmask, K - 2, K) * s1.to(tl.float32)
        if K > 3:
            s2 = tl.load(st + 2 * stride_sk, mask=cmask, other=0.0)
            acc += _lag_weight(w_ptr, offs_c, stride_wc, stride_wk, cmask, K - 3, K) * s2.to(tl.float32)
        if K > 2:
            tl.store(st, s1, mask=cmask)
        if K > 3:
            tl.store(st + stride_sk, s2, mask=cmask)
        tl.store(st + (K - 2) * stride_sk, xs, mask=cmask)
        y = acc * tl.sigmoid(acc)
        tl.store(out_ptr + b * stride_ob + offs_c, y.to(out_ptr.dtype.element_ty), mask=cmask)

    # The kernels find their helpers by name. Compiled Triton also looks in closures, but the CPU
    # interpreter (TRITON_INTERPRET=1, used by the tests) resolves names through the module's
    # globals only, so publish them there.
    globals().update(tl=tl, _load_pos=_load_pos, _seq_at=_seq_at, _lag_weight=_lag_weight, _bias=_bias,
                     _sigmoid=_sigmoid, _bwd_row=_bwd_row)
    return conv_fwd, conv_bwd, conv_update


def _launch_config(channels: int, dtype: torch.dtype, which: str) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_S, num_warps) for the 'fwd' / 'bwd' kernels.

    BLOCK_C * element size / (32 * num_warps) sets the bytes each thread loads per row (16 is a
    full vector load); BLOCK_S trades the K-1 row halo (re-read per program) against unrolled code
    size and register use (all of a block's loads are in flight at once). Picked from a sweep on
    an H200 (S=8192, C=6144, bf16): forward ~62 us, backward kernel ~105 us with these.
    """
    if which == "fwd":
        return 256, 16, 2
    return 256, 8, 2


# The backward gives each program several blocks of rows (fewer dweight partials to write and
# reduce, and fewer halo rows to recompute) while keeping at least about this many programs.
_BWD_TARGET_PROGRAMS = 2048
_BWD_MAX_CHUNKS = 8


def _fast_math() -> bool:
    """Approximate-math PTX (see _sigmoid) except under the CPU interpreter, which can't run PTX."""
    return os.environ.get("TRITON_INTERPRET") != "1"


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.stride(-1) != 1:
        raise ValueError("causal_conv1d_triton needs channels contiguous (x.stride(-1) == 1)")
    if not 2 <= weight.shape[-1] <= MAX_K:
        raise ValueError(f"conv width {weight.shape[-1]} not supported (2..{MAX_K})")


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor | None,
             initial_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weight)
    conv_fwd, _, _ = _kernels()
    bsz, seqlen, channels = x.shape
    k = weight.shape[-1]
    out = torch.empty((bsz, seqlen, channels), dtype=x.dtype, device=x.device)
    final = torch.empty((bsz, channels, k - 1), dtype=weight.dtype, device=x.device)
    if bsz == 0 or channels == 0:
        return out, final
    block_c, block_s, warps = _launch_config(channels, x.dtype, "fwd")
    # Unused pointers get x: the matching HAS_* flag keeps the kernel from touching them.
    seq = seq_idx if seq_idx is not None else x
    init = initial_state if initial_state is not None else x
    qs = seq_idx.stride() if seq_idx is not None else (0, 0)
    ist = initial_state.stride() if initial_state is not None else (0, 0, 0)
    grid = (max(_cdiv(seqlen, block_s), 1), _cdiv(channels, block_c), bsz)
    conv_fwd[grid](
        x, weight, bias if bias is not None else weight, seq, init, out, final, seqlen, channels,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), qs[0], qs[1],
        ist[0], ist[1], ist[2], out.stride(0), out.stride(1), final.stride(0), final.stride(1), final.stride(2),
        K=k, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, HAS_STATE=initial_state is not None,
        FAST=_fast_math(), BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps)
    return out, final


def _backward(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              seq_idx: torch.Tensor | None, initial_state: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    _, conv_bwd, _ = _kernels()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    bsz, seqlen, channels = x.shape
    k = weight.shape[-1]
    block_c, block_s, warps = _launch_config(channels, x.dtype, "bwd")
    n_blocks, n_cblocks = max(_cdiv(seqlen, block_s), 1), _cdiv(channels, block_c)
    # A power of two (it is a compile-time constant: few variants).
    chunks = 1
    while chunks < _BWD_MAX_CHUNKS and bsz * n_blocks * n_cblocks >= 2 * chunks * _BWD_TARGET_PROGRAMS:
        chunks *= 2
    n_s = _cdiv(n_blocks, chunks)
    dx = torch.empty((bsz, seqlen, channels), dtype=x.dtype, device=x.device)
    dw_part = torch.empty((bsz * n_s, k, channels), dtype=torch.float32, device=x.device)
    db_part = torch.empty((bsz * n_s, channels), dtype=torch.float32, device=x.device) if bias is not None else None
    if bsz == 0 or channels == 0:
        return dx, torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias)
    seq = seq_idx if seq_idx is not None else x
    init = initial_state if initial_state is not None else x
    qs = seq_idx.stride() if seq_idx is not None else (0, 0)
    ist = initial_state.stride() if initial_state is not None else (0, 0, 0)
    grid = (n_s, n_cblocks, bsz)
    conv_bwd[grid](
        x, weight, bias if bias is not None else weight, seq, init, dout, dx, dw_part,
        db_part if db_part is not None else dw_part, seqlen, channels,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), qs[0], qs[1],
        ist[0], ist[1], ist[2], dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1),
        K=k, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, HAS_STATE=initial_state is not None,
        FAST=_fast_math(), CHUNKS=chunks, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps)
    dweight = dw_part.sum(0).t().contiguous().to(weight.dtype).view_as(weight)
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


class _CausalConv1d(torch.autograd.Function):
    """Gradients reach x, weight and bias. initial_state (a cache) and seq_idx get none, and
    final_state is not differentiable (it only feeds the cache)."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, initial_state):
        out, final = _forward(x, weight, bias, seq_idx, initial_state)
        ctx.save_for_backward(x, weight, bias, seq_idx, initial_state)
        ctx.mark_non_differentiable(final)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for final_state
        return out, final

    @staticmethod
    def backward(ctx, dout, _dfinal):
        if dout is None:
            return None, None, None, None, None
        x, weight, bias, seq_idx, initial_state = ctx.saved_tensors
        dx, dweight, dbias = _backward(dout, x, weight, bias, seq_idx,
                                       initial_state.detach() if initial_state is not None else None)
        return dx, dweight, dbias, None, None


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`nemotron_core.ops.conv.causal_conv1d`.

    x ``[B, S, C]`` (channels contiguous; B and S may be strided), weight ``[C, K]`` (2 <= K <= 4),
    bias ``[C]`` or None, seq_idx ``[B, S]`` document ids or None, initial_state ``[B, C, K-1]`` or
    None. Returns ``silu(conv)`` as a new contiguous ``[B, S, C]`` tensor in x's dtype (fp32
    accumulation with the weights' own precision) and the last K-1 inputs ``[B, C, K-1]`` in the
    weight's dtype.
    """
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if needs_grad:
        return _CausalConv1d.apply(x, weight, bias, seq_idx, initial_state)
    return _forward(x, weight, bias, seq_idx, initial_state)


def causal_conv1d_update_triton(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One decode step, same contract as :func:`nemotron_core.ops.conv.causal_conv1d_step`.

    x ``[B, C]`` (channels contiguous); ``conv_state`` ``[B, C, K-1]`` is shifted left and x
    appended, in place. Returns ``silu(conv)`` ``[B, C]`` in x's dtype. A single kernel launch.
    """
    _check(x, weight)
    _, _, conv_update = _kernels()
    bsz, channels = x.shape
    k = weight.shape[-1]
    out = torch.empty((bsz, channels), dtype=x.dtype, device=x.device)
    if bsz == 0 or channels == 0:
        return out
    block_c = 256
    conv_update[(bsz, _cdiv(channels, block_c))](
        x, conv_state, weight, bias if bias is not None else weight, out, channels,
        x.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        weight.stride(0), weight.stride(1), out.stride(0),
        K=k, HAS_BIAS=bias is not None, BLOCK_C=block_c, num_warps=2)
    return out


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the Triton kernels can take these inputs (else use ``ops.conv``)."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    if x.dtype not in _DTYPES or x.stride(-1) != 1 or not 2 <= weight.shape[-1] <= MAX_K:
        return False
    try:
        _kernels()
    except ImportError:
        return False
    return True
