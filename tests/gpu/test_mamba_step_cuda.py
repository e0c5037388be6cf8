"""The fused Mamba2 decode step (ops/triton_mamba_step.py) on the GPU: against the three kernels it
replaces (our conv update, mamba-ssm's state update and gated norm) on the Nano shape in bf16, against
the fp32 reference, inside a graph-captured decoder, and its time (reported, not asserted)."""
from __future__ import annotations

import pytest
import torch

from .common import check_switch_keeps_decode_logits, count_calls, rel, triton_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

H, G, P, N, K = 64, 8, 64, 128, 4  # the Nano 30B-A3B Mamba block
D_INNER = H * P


def _ops():
    return triton_ops("triton_mamba_step")


def _inputs(bsz: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    conv_dim = D_INNER + 2 * G * N
    return dict(zx=r(bsz, 2 * D_INNER + 2 * G * N + H), conv_state=r(bsz, conv_dim, K - 1),
                ssm_state=r(bsz, H, P, N, dtype=torch.float32), conv_weight=r(conv_dim, K, scale=0.5),
                conv_bias=r(conv_dim, scale=0.1), A=-torch.rand(H, generator=g, device="cuda").add(0.5),
                D=r(H, dtype=torch.float32), dt_bias=r(H, scale=0.5, dtype=torch.float32),
                norm_weight=r(D_INNER, scale=0.2).add(1.0))


def _fused(t, conv_state, ssm_state):
    return _ops().mamba_step(t["zx"], conv_state, t["conv_weight"], t["conv_bias"], ssm_state, t["A"], t["D"],
                             t["dt_bias"], (0.0, float("inf")), t["norm_weight"], 1e-5, G)


def _three_kernels(t, conv_state, ssm_state):
    """What Mamba2.forward ran at decode before: triton_conv's update, mamba-ssm's state update and
    gated norm."""
    from nemotron_core.backend import mamba_triton_ops
    from nemotron_core.ops.triton_conv import causal_conv1d_update_triton

    ops = mamba_triton_ops()
    bsz = t["zx"].shape[0]
    z, xbc, dt = t["zx"].split([D_INNER, D_INNER + 2 * G * N, H], dim=-1)
    xbc = causal_conv1d_update_triton(xbc, conv_state, t["conv_weight"], t["conv_bias"])
    x, B, C = xbc.split([D_INNER, G * N, G * N], dim=-1)
    y = ops["state_update"](ssm_state, x.view(bsz, H, P), dt[..., None].expand(-1, -1, P),
                            t["A"][:, None, None].expand(-1, P, N), B.view(bsz, G, N), C.view(bsz, G, N),
                            D=t["D"][:, None].expand(-1, P), dt_bias=t["dt_bias"][:, None].expand(-1, P),
                            dt_softplus=True)
    return ops["gated_rmsnorm"](y.view(bsz, D_INNER), t["norm_weight"], None, z=z, eps=1e-5,
                                group_size=D_INNER // G, norm_before_gate=False)


@pytest.mark.parametrize("bsz", [1, 8])
def test_matches_the_kernels_it_replaces(bsz: int) -> None:
    """bf16 on the Nano shape, three steps in a row: the output within a bf16 rounding of the old path's
    (the two differ only in the order of fp32 sums, then round to bf16), the conv state identical, the
    fp32 SSM state to 1e-5; and both within bf16 tolerance of the fp32 reference."""
    ops = _ops()
    from nemotron_core.backend import mamba_triton_ops

    if mamba_triton_ops() is None:
        pytest.skip("mamba-ssm is not installed")
    t = _inputs(bsz)
    cs_a, ss_a = t["conv_state"].clone(), t["ssm_state"].clone()
    cs_b, ss_b = t["conv_state"].clone(), t["ssm_state"].clone()
    cs_r, ss_r = t["conv_state"].float(), t["ssm_state"].clone()
    for step in range(3):
        t["zx"] = _inputs(bsz, seed=10 + step)["zx"]
        got = _fused(t, cs_a, ss_a)
        old = _three_kernels(t, cs_b, ss_b)
        want = ops.mamba_step_reference(t["zx"].float(), cs_r, t["conv_weight"].float(), t["conv_bias"].float(), ss_r,
                                        t["A"], t["D"], t["dt_bias"], (0.0, float("inf")), t["norm_weight"].float(),
                                        1e-5, G)
        assert rel(got, old) <= 2 ** -7, f"step {step}"
        assert torch.equal(cs_a, cs_b)
        assert rel(ss_a, ss_b) <= 1e-5
        assert rel(got, want) <= 2e-2 and rel(old, want) <= 2e-2


def test_decoder_with_fused_step_matches(monkeypatch) -> None:
    """The tiny preset in fp32, decoded from a CUDA graph with and without the fused step: every step's
    logits agree to fp32 rounding."""
    check_switch_keeps_decode_logits(monkeypatch, _ops(), "mamba_step", pad=5)


def test_default_policy(monkeypatch) -> None:
    """ENABLED None (the default): a bf16 tiny model's decode step takes the fused kernel without mamba-ssm
    (hidden here) at any batch; with mamba-ssm only at batch 1 with programmatic dependent launch."""
    ops = _ops()
    from nemotron_core import backend
    from nemotron_core.create import build_config, random_model
    from nemotron_core.generation import Decoder
    from nemotron_core.ops import triton_moe

    model = random_model(build_config("tiny"), torch.bfloat16, seed=0, device="cuda").eval()
    layers = build_config("tiny").hybrid_override_pattern.count("M")
    ids = torch.randint(3, 1000, (2, 24), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    calls = count_calls(monkeypatch, ops, "mamba_step")
    monkeypatch.setattr(ops, "ENABLED", None)

    def fused_steps(batch: int) -> int:
        calls.clear()
        dec = Decoder(model, batch_size=batch, max_length=32, cuda_graph=False)
        with torch.no_grad():
            dec.prefill(ids[:batch, :16], torch.ones_like(ids[:batch, :16]))
            for i in range(4):
                dec.step(ids[:batch, 16 + i])
        return len(calls)

    if backend.mamba_triton_ops() is not None:
        pdl = torch.cuda.get_device_capability()[0] >= 9
        assert fused_steps(1) == (4 * layers if pdl else 0)
        assert fused_steps(2) == 0
        monkeypatch.setattr(triton_moe, "PDL", False)
        assert fused_steps(1) == 0
    monkeypatch.setattr(backend, "mamba_triton_ops", lambda: None)
    assert fused_steps(1) == fused_steps(2) == 4 * layers


def test_timing_report(capsys) -> None:
    """Not an assertion: one Nano Mamba layer's decode step between the projections, the fused kernel
    against the three it replaces (triton's do_bench_cudagraph: calls replayed from a CUDA graph)."""
    _ops()
    from triton.testing import do_bench_cudagraph

    from nemotron_core.backend import mamba_triton_ops

    if mamba_triton_ops() is None:
        pytest.skip("mamba-ssm is not installed")
    rows = []
    for bsz in (1, 8):
        t = _inputs(bsz)
        for name, fn in (("fused", _fused), ("conv + state update + norm", _three_kernels)):
            cs, ss = t["conv_state"].clone(), t["ssm_state"].clone()
            fn(t, cs, ss)  # compile outside the capture
            us = do_bench_cudagraph(lambda fn=fn, cs=cs, ss=ss: fn(t, cs, ss), rep=50) * 1e3
            rows.append(f"  B={bsz} {name:<28} {us:6.2f} us")
    with capsys.disabled():
        print(f"\nMamba decode step between the projections, H={H} G={G} P={P} N={N} (CUDA graph, per layer):")
        print("\n".join(rows))
