"""Flash-decoding (``nemotron_core.ops.triton_decode_attn``) on CUDA at the Nemotron-3 Nano attention
shape (Hq=32, Hkv=2, D=128, bf16) with a 4096-position cache.

    python -m pytest tests/gpu/test_decode_attn_cuda.py -q

The reference is ``decode_attention_reference`` on fp32 copies of the bf16 inputs (exact softmax in
fp32). The kernel rounds the probabilities to bf16 for its P @ V dot (as FlashAttention and the
repo's eager_attention do) and its output to bf16, so it sits a few bf16 ulps from the reference:
within 1e-2 of the largest output, and no worse than 2x the error of torch's bf16 SDPA (the path it
replaces: masked attention over the whole buffer) against the same reference. The caches after a
call must hold exactly the reference's (the new row at pos).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .common import check_switch_keeps_decode_logits, rel, triton_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HQ, HKV, D, L = 32, 2, 128, 4096
BF16_TOL = 1e-2


def _ops():
    return triton_ops("triton_decode_attn")


def _inputs(b: int, pos: int, seed: int):
    """bf16 q/k_new/v_new as the model makes them (transposed views), random caches, and left padding:
    row r starts at 37 * r (row 0 unpadded), valid up to and including pos."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=g).bfloat16()  # noqa: E731
    q = r(b, 1, HQ, D).transpose(1, 2)
    k_new, v_new = r(b, 1, HKV, D).transpose(1, 2), r(b, 1, HKV, D).transpose(1, 2)
    k_cache, v_cache = r(b, HKV, L, D), r(b, HKV, L, D)
    valid = torch.zeros(b, L, dtype=torch.bool, device="cuda")
    for row in range(b):
        valid[row, min(37 * row, pos):pos + 1] = True
    return q, k_new, v_new, k_cache, v_cache, torch.tensor([pos], device="cuda"), valid


def _fp32_reference(q, k_new, v_new, k_cache, v_cache, pos, valid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp32 output, the caches after the write in bf16), from fp32 copies: nothing rounded inside."""
    ops = _ops()
    kc, vc = k_cache.float(), v_cache.float()
    out = ops.decode_attention_reference(q.float(), k_new.float(), v_new.float(), kc, vc, pos, valid, D ** -0.5)
    return out, kc.bfloat16(), vc.bfloat16()


def _sdpa_bf16(q, k_new, v_new, k_cache, v_cache, pos, valid) -> torch.Tensor:
    """The path the kernel replaces: write the row, then bf16 SDPA over the whole buffer with a mask."""
    kc, vc = k_cache.clone(), v_cache.clone()
    kc.index_copy_(2, pos, k_new)
    vc.index_copy_(2, pos, v_new)
    seen = valid & (torch.arange(L, device="cuda") <= pos)
    return F.scaled_dot_product_attention(q, kc, vc, attn_mask=seen[:, None, None, :], scale=D ** -0.5,
                                          enable_gqa=True)


@pytest.mark.parametrize("pos", [100, 4000])
@pytest.mark.parametrize("b", [1, 8])
def test_matches_fp32_reference(b: int, pos: int) -> None:
    ops = _ops()
    inputs = _inputs(b, pos, seed=b * 10000 + pos)
    q, k_new, v_new, k_cache, v_cache, pos_t, valid = inputs
    assert ops.supported(q, k_cache)
    want, want_k, want_v = _fp32_reference(*inputs)
    sdpa_err = rel(_sdpa_bf16(*inputs), want)
    kc, vc = k_cache.clone(), v_cache.clone()
    got = ops.decode_attention(q, k_new, v_new, kc, vc, pos_t, valid, D ** -0.5)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    err = rel(got, want)
    assert err <= BF16_TOL, f"error {err:.2e}"
    assert err <= 2 * sdpa_err, f"error {err:.2e} against SDPA's {sdpa_err:.2e}"
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_positions_after_pos_are_not_read() -> None:
    ops = _ops()
    q, k_new, v_new, k_cache, v_cache, pos, valid = _inputs(8, 100, seed=5)
    clean = ops.decode_attention(q, k_new, v_new, k_cache.clone(), v_cache.clone(), pos, valid, D ** -0.5)
    k_cache[:, :, 101:] = float("nan")
    v_cache[:, :, 101:] = float("nan")
    valid[:, 101:] = True
    got = ops.decode_attention(q, k_new, v_new, k_cache, v_cache, pos, valid, D ** -0.5)
    assert torch.equal(got, clean)


@pytest.mark.parametrize("b", [1, 8])
def test_captured_graph_follows_pos_and_cache(b: int) -> None:
    """Capture once (at pos 5), then for each new position: new inputs and cache contents copied into
    the captured buffers, pos moved on the device, replay; output and caches against the reference."""
    ops = _ops()
    q, k_new, v_new, k_cache, v_cache, pos, valid = _inputs(b, 5, seed=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        ops.decode_attention(q, k_new, v_new, k_cache, v_cache, pos, valid, D ** -0.5)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.decode_attention(q, k_new, v_new, k_cache, v_cache, pos, valid, D ** -0.5)
    for step, p in enumerate((100, 4000, 2047, L - 1)):
        new = _inputs(b, p, seed=100 + step)
        for buf, value in zip((q, k_new, v_new, k_cache, v_cache, pos, valid), new):
            buf.copy_(value)
        want, want_k, want_v = _fp32_reference(*new)
        sdpa_err = rel(_sdpa_bf16(*new), want)
        graph.replay()
        err = rel(out, want)
        assert err <= BF16_TOL and err <= 2 * sdpa_err, f"pos {p}: error {err:.2e} (SDPA {sdpa_err:.2e})"
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v), f"pos {p}"


def test_decoder_with_kernel_matches_sdpa_path(monkeypatch) -> None:
    """The tiny preset (head_dim 16) in fp32, decoded from a CUDA graph with and without the kernel:
    the logits of every step agree to fp32 rounding (both attention paths are exact fp32 there)."""
    check_switch_keeps_decode_logits(monkeypatch, _ops(), "decode_attention", pad=7)


def test_timing_report(capsys) -> None:
    """Not an assertion: one layer's decode attention, the kernel vs. write_kv_at + masked bf16 SDPA
    over the whole buffer (the path it replaces), median of do_bench, in microseconds."""
    ops = _ops()
    from triton.testing import do_bench

    rows = []
    for b in (1, 8):
        for p in (100, 1000, 4000):
            q, k_new, v_new, k_cache, v_cache, pos, valid = _inputs(b, p, seed=0)
            mask = valid[:, None, None, :]

            def kernel():
                ops.decode_attention(q, k_new, v_new, k_cache, v_cache, pos, valid, D ** -0.5)

            def sdpa():
                k_cache.index_copy_(2, pos, k_new)
                v_cache.index_copy_(2, pos, v_new)
                F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=D ** -0.5, enable_gqa=True)

            t_kernel = do_bench(kernel, warmup=25, rep=200, return_mode="median") * 1e3
            t_sdpa = do_bench(sdpa, warmup=25, rep=200, return_mode="median") * 1e3
            chunk, splits = ops.split_plan(L, b * HKV, torch.cuda.get_device_properties(0).multi_processor_count)
            rows.append(f"  B={b} pos={p:>4} (chunk {chunk}, {splits} splits): kernel {t_kernel:7.1f} us, "
                        f"index_copy_ + SDPA {t_sdpa:7.1f} us")
    with capsys.disabled():
        print(f"\ndecode attention, Hq={HQ} Hkv={HKV} D={D} bf16, cache of {L} positions (eager launches, "
              "launch overhead included):")
        print("\n".join(rows))
