"""Flash-decoding for the static-shape decode step: write the new K/V row, attend over ``0..pos`` only.

Why: the decode step runs inside a CUDA graph, so its shapes are fixed when the graph is captured.
The torch path therefore writes the new row with two ``index_copy_`` launches and then runs SDPA with
a boolean mask over the *whole* preallocated cache (``max_length`` positions): every step reads the
full K/V buffers and the mask, however few positions are filled, so a step at position 100 of a
4k-position cache costs as much as one at position 4000. Here the position is read on the device
and every program stops at ``pos``: the grid is static (graph-capturable, no host sync) but the bytes
read, which is what a decode step's attention costs, follow the current length, not ``max_length``.

Two launches:

* ``decode_attn_partial``, grid ``(B * Hkv, SPLITS)``: one program per (row, kv head, chunk of
  ``CHUNK`` positions) takes all ``G = Hq // Hkv`` query heads that share the kv head, so each K/V
  byte is read once for the whole group. It walks its chunk in ``BLOCK_L`` blocks up to ``pos`` with
  an online (running max) softmax in fp32 and leaves a partial: max, sum of exponentials and the
  un-normalised output. The program whose chunk holds ``pos`` takes that position's K/V from
  ``k_new``/``v_new`` (not from the cache, which it writes in this same launch) and writes them
  into the cache. Chunks that start after ``pos`` leave an empty partial at once.
* ``decode_attn_combine``, grid ``(B * Hq,)``: merges a head's partials and writes the output.

``decode_attention_reference`` is the plain-PyTorch definition (and the tests' reference). Kernels
are built on first use, so importing this module does not need triton; on CPU tensors they run under
Triton's interpreter (tests only: the model takes this path on CUDA only).
"""
from __future__ import annotations

import functools
import math

import torch

from .triton_moe import _next_pow2, interpreting, pdl_launch, usable

# Whether the model's decode step uses these kernels (on CUDA, see modeling/attention.py): a global
# switch, so a benchmark can measure with and without.
ENABLED = True
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Positions per block of the inner loop (at most; see _block), and the smallest chunk: a chunk
# is at least one block.
BLOCK_L = 64
MIN_CHUNK = 64
# tl.dot needs at least 16 rows; query-head groups are padded up to that (see the kernel for why).
MIN_G_PAD = 16
# The accumulator is [G_PAD, D] fp32 per program: keep it within a few dozen registers a thread.
MAX_ACC = 8192
# SM count assumed where there is no device to ask (the interpreter): an H100/H200's.
_DEFAULT_SMS = 132
_LOG2E = 1.0 / math.log(2.0)


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents

    @triton.jit
    def decode_attn_partial(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, pos_ptr, valid_ptr, m_ptr, l_ptr, o_ptr,
                            HKV, L, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                            stride_cb, stride_ch, stride_cl, stride_mb, qk_scale,
                            G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                            CHUNK: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
                            INTERPRET: tl.constexpr):
        row = tl.program_id(0)  # b * HKV + kv head
        split = tl.program_id(1)
        b = (row // HKV).to(tl.int64)
        hk = (row % HKV).to(tl.int64)
        pos = tl.load(pos_ptr).to(tl.int32)
        start = split * CHUNK
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        mask_g = offs_g < G
        # Query head hk * G + g of row b is partial row (b * HKV + hk) * G + g = row * G + g.
        part = (row.to(tl.int64) * G + offs_g) * SPLITS + split
        if start > pos:
            # Nothing to attend to here. The output partial is left unwritten: the combine never
            # reads the output of a partial whose max is -inf.
            tl.store(m_ptr + part, tl.full([G_PAD], float("-inf"), tl.float32), mask=mask_g)
            tl.store(l_ptr + part, tl.zeros([G_PAD], tl.float32), mask=mask_g)
            return
        # The G query heads are the rows of both tl.dot calls, padded to tl.dot's minimum of 16 (the
        # Nano's G is 16: no padding). A step is bound by reading K/V: each K/V element takes part in
        # 2G multiply-adds, far below what the tensor cores do per byte loaded, so padded rows cost
        # nothing that matters. A broadcast-and-sum would run on the CUDA cores instead and hold a
        # [G, BLOCK, D] product in registers. Padded rows are zeros: finite scores, never stored.
        q = tl.load(q_ptr + b * stride_qb + (hk * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_g[:, None], other=0.0)
        k_new = tl.load(kn_ptr + b * stride_kb + hk * stride_kh + offs_d)
        v_new = tl.load(vn_ptr + b * stride_vb + hk * stride_vh + offs_d)
        cache = b * stride_cb + hk * stride_ch
        end = tl.minimum(pos + 1, tl.minimum(start + CHUNK, L))
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        # Compiled, the loop stops at pos. Triton's interpreter cannot take a trip count read from
        # memory (with numpy 2 it fails turning the 1-element scalar into an int), so there it runs
        # over the whole chunk and the masks (offs_l < end) stop at pos; the same body either way.
        for off in range(0, CHUNK if INTERPRET else end - start, BLOCK):
            offs_l = start + off + tl.arange(0, BLOCK)
            live = offs_l < end
            ok = tl.load(valid_ptr + b * stride_mb + offs_l, mask=live, other=0) != 0
            seen = live & ok
            # Only visible positions are read: masked-out rows (padding, and anything past pos) may
            # hold anything, NaN included, without reaching the result. Position pos is not read
            # either: this program writes it below, and k_new/v_new stand in for it.
            from_cache = seen & (offs_l != pos)
            kv = cache + offs_l.to(tl.int64)[:, None] * stride_cl + offs_d[None, :]
            k = tl.load(kc_ptr + kv, mask=from_cache[:, None], other=0.0)
            v = tl.load(vc_ptr + kv, mask=from_cache[:, None], other=0.0)
            is_new = (offs_l == pos)[:, None]
            k = tl.where(is_new, k_new[None, :], k)
            v = tl.where(is_new, v_new[None, :], v)
            # Scores in log2 units (qk_scale = scale * log2(e)), so the exponentials are exp2.
            # Products in the input dtype, sums in fp32 (the IEEE path for fp32: no TF32).
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(seen[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # While every score so far is masked, m_new is -inf and s - m_new would be NaN: subtract
            # 0 instead, which makes p and alpha 0 (and l and acc, still 0, stay 0).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # p rounded to V's dtype for the tensor-core dot, as FlashAttention does and as
            # eager_attention rounds its probabilities; exact for fp32.
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if pos < start + CHUNK:  # this chunk holds pos (start <= pos here)
            row_new = cache + pos.to(tl.int64) * stride_cl + offs_d
            tl.store(kc_ptr + row_new, k_new)
            tl.store(vc_ptr + row_new, v_new)
        tl.store(m_ptr + part, m_i, mask=mask_g)
        tl.store(l_ptr + part, l_i, mask=mask_g)
        tl.store(o_ptr + part[:, None] * D + offs_d[None, :], acc, mask=mask_g[:, None])

    @triton.jit
    def decode_attn_combine(m_ptr, l_ptr, o_ptr, out_ptr, SPLITS: tl.constexpr, D: tl.constexpr,
                            BLOCK_S: tl.constexpr, TRIGGER: tl.constexpr):
        if TRIGGER:  # let the next kernel (o_proj's GEMV) start loading its weights now
            gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)  # b * HQ + query head
        offs_d = tl.arange(0, D)
        m_run = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), axis=0)
        l_run = tl.sum(tl.zeros([BLOCK_S], tl.float32), axis=0)
        acc = tl.zeros([D], tl.float32)
        # Blocks of splits with the same running-max merge as the partial kernel: a long cache may
        # have a few hundred splits, too many to hold as one [SPLITS, D] tile.
        for s0 in range(0, SPLITS, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            in_s = offs_s < SPLITS
            m_s = tl.load(m_ptr + row * SPLITS + offs_s, mask=in_s, other=float("-inf"))
            l_s = tl.load(l_ptr + row * SPLITS + offs_s, mask=in_s, other=0.0)
            # Empty partials (max -inf: chunks after pos, or all masked) are never read, so their
            # output need not be written, and cost no traffic here. (A NaN max is read: NaN inputs
            # give a NaN output, as in the reference, rather than being dropped.)
            has = m_s != float("-inf")
            o_s = tl.load(o_ptr + (row * SPLITS + offs_s)[:, None] * D + offs_d[None, :], mask=has[:, None],
                          other=0.0)
            m_new = tl.maximum(m_run, tl.max(m_s, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_run - m_use)
            w = tl.exp2(m_s - m_use)
            l_run = l_run * alpha + tl.sum(w * l_s, axis=0)
            acc = acc * alpha + tl.sum(w[:, None] * o_s, axis=0)
            m_run = m_new
        # A row with no visible position at all gets zeros (as the reference does), not 0/0 = NaN.
        # It cannot happen in the Decoder, which marks pos valid before every step.
        out = tl.where(l_run > 0.0, acc / tl.maximum(l_run, 1e-30), 0.0)
        tl.store(out_ptr + row * D + offs_d, out.to(out_ptr.dtype.element_ty))

    globals().update(gdc_launch_dependents=gdc_launch_dependents)  # (the interpreter's names)
    return decode_attn_partial, decode_attn_combine


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_plan(length: int, rows: int, sms: int = _DEFAULT_SMS) -> tuple[int, int]:
    """``(CHUNK, SPLITS)`` for a cache of ``length`` positions and ``rows = B * Hkv`` (kv head, row) pairs.

    Aim for about two programs per SM when the whole cache is in use: ``SPLITS ~ 2 * sms / rows``,
    i.e. ``CHUNK`` the power of two at or above ``length / SPLITS``, at least ``MIN_CHUNK`` (one
    block; smaller chunks would only add partials to merge). Only the chunks up to ``pos`` do any
    work, so a short prefix of a long cache runs on few SMs but reads little; chunks past ``pos``
    exit at once. Depends on the cache's shape and the device only, so it is fixed for a cache and
    a captured graph stays valid as ``pos`` moves. With ``rows >= 2 * sms`` a program walks a whole
    row (``SPLITS = 1``): the rows alone fill the GPU.
    """
    target = max(1, -(-2 * sms // rows))
    chunk = max(MIN_CHUNK, _next_pow2(-(-length // target)))
    return chunk, -(-length // chunk)


def _block(d: int, elem: int) -> int:
    """Positions per loop block: ``BLOCK_L``, fewer for wide rows. A block of K and of V is 16 KiB at
    most (64 bf16 rows of 128), so the two pipeline stages the loop is compiled with stay well within
    shared memory even for fp32 rows of 256 (and tl.dot's minimum of 16 rows holds)."""
    return max(16, min(BLOCK_L, 16384 // (d * elem)))


def supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether ``decode_attention`` can take a query ``[B, Hq, 1, D]`` against ``k_cache [B, Hkv, L, D]``:
    one query position, fp32/fp16/bf16 (the same for both), D a power of two in [16, 256], Hq a
    multiple of Hkv (with a group small enough for one program's accumulator), on CUDA with triton
    or on CPU under the interpreter."""
    if q.dim() != 4 or k_cache.dim() != 4 or q.shape[2] != 1:
        return False
    b, hq, _, d = q.shape
    kb, hkv, _, kd = k_cache.shape
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or q.device != k_cache.device:
        return False
    if kb != b or kd != d or d < 16 or d > 256 or d & (d - 1) or hkv == 0 or hq % hkv:
        return False
    if max(MIN_G_PAD, _next_pow2(hq // hkv)) * d > MAX_ACC:
        return False
    return usable(q)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, scale: float, *,
                     chunk: int | None = None, block_l: int | None = None) -> torch.Tensor:
    """One decode step of attention: writes ``k_new``/``v_new [B, Hkv, 1, D]`` into
    ``k_cache``/``v_cache [B, Hkv, L, D]`` at position ``pos`` (int64 ``[1]``, on the device) and
    returns ``[B, Hq, 1, D]`` in q's dtype: for each query head ``h`` (kv head ``h // (Hq // Hkv)``),
    the softmax over positions ``j <= pos`` with ``valid[b, j]`` of ``scale * q . k_j``, times
    ``v_j``; fp32 accumulation. ``valid [B, L]`` bool must already be True at ``pos`` where that
    position is to be seen. A row with no visible position gets zeros.

    No host sync and a grid fixed by the shapes: capturable in a CUDA graph. ``chunk`` (a power of
    two, at least 16) and ``block_l`` override ``split_plan`` and ``BLOCK_L`` (for tests).
    """
    if not supported(q, k_cache):
        raise ValueError(f"decode_attention does not support q {tuple(q.shape)} {q.dtype} against a cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype} on {q.device}")
    b, hq, _, d = q.shape
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    if k_new.shape != (b, hkv, 1, d) or v_new.shape != k_new.shape:
        raise ValueError(f"k_new/v_new must be {(b, hkv, 1, d)}, got {tuple(k_new.shape)}, {tuple(v_new.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have the same shape and strides, unit stride along D")
    if k_new.dtype != q.dtype or v_new.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError("q, k_new, v_new and the caches must share one dtype")
    if valid.shape != (b, length) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool [{b}, {length}] mask, got {valid.dtype} {tuple(valid.shape)}")
    if pos.numel() != 1:
        raise ValueError(f"pos must hold one position, got shape {tuple(pos.shape)}")
    q, k_new, v_new, valid = (_unit_stride(t) for t in (q, k_new, v_new, valid))
    if chunk is None:
        chunk, splits = split_plan(length, b * hkv, _sm_count(q.device))
    else:
        if chunk < 16 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
        splits = -(-length // chunk)
    block = min(chunk, block_l or _block(d, q.element_size()))
    g = hq // hkv
    g_pad = max(MIN_G_PAD, _next_pow2(g))
    dev = q.device
    m = torch.empty(b * hq, splits, dtype=torch.float32, device=dev)
    l_sum = torch.empty_like(m)
    o = torch.empty(b * hq, splits, d, dtype=torch.float32, device=dev)
    out = torch.empty(b, hq, 1, d, dtype=q.dtype, device=dev)
    partial, combine = _kernels()
    partial[(b * hkv, splits)](
        q, k_new, v_new, k_cache, v_cache, pos, valid.view(torch.uint8), m, l_sum, o,
        hkv, length, q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), valid.stride(0), float(scale) * _LOG2E,
        G=g, G_PAD=g_pad, D=d, SPLITS=splits, CHUNK=chunk, BLOCK=block, IEEE=q.dtype == torch.float32,
        INTERPRET=interpreting(),
        num_warps=4 if g_pad * d <= 4096 else 8, num_stages=2)
    combine[(b * hq,)](m, l_sum, o, out, SPLITS=splits, D=d, BLOCK_S=min(16, _next_pow2(splits)),
                       TRIGGER=pdl_launch(q), num_warps=1 if d <= 64 else 2)
    return out


def decode_attention_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                               v_cache: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """What ``decode_attention`` computes, in plain PyTorch: ``index_copy_`` into the caches, then a
    masked softmax over positions ``0..pos`` in fp32 (output in q's dtype; zeros for a row with no
    visible position). Reads ``pos`` on the host: a reference, not for CUDA graphs."""
    k_cache.index_copy_(2, pos, k_new)
    v_cache.index_copy_(2, pos, v_new)
    n = int(pos.reshape(-1)[0].item()) + 1
    rep = q.shape[1] // k_cache.shape[1]
    k = k_cache[:, :, :n].float().repeat_interleave(rep, dim=1)
    v = v_cache[:, :, :n].float().repeat_interleave(rep, dim=1)
    seen = valid[:, None, None, :n]
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~seen, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - torch.where(top == float("-inf"), 0.0, top))
    total = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v) / torch.where(total > 0, total, 1.0)
    return out.to(q.dtype)
