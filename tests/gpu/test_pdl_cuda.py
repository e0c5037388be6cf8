"""Programmatic dependent launch in the captured decode step: the output projections' register-preload
GEMV, the MoE block's route kernel and its expert up-projection start while the kernel before them
runs; nothing they read early may change, so the logits must be bit-identical with PDL on and off."""
from __future__ import annotations

import pytest
import torch

from .common import count_calls, graph_decode_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_pdl_changes_no_bit(monkeypatch) -> None:
    pytest.importorskip("triton")
    from nemotron_core.create import build_config, random_model
    from nemotron_core.ops import triton_gemv, triton_mamba_step, triton_moe

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    model = random_model(build_config("tiny"), torch.bfloat16, seed=0, device="cuda").eval()
    model.model.backend.linear = "triton"  # every single-row projection on the GEMV (tiny shapes: all preload)
    monkeypatch.setattr(triton_mamba_step, "ENABLED", True)  # its kernel signals out_proj's GEMV early
    ids = torch.randint(3, 1000, (1, 40), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    mask = torch.ones(1, 20, dtype=torch.long, device="cuda")
    calls = []
    real = triton_moe.pdl_launch
    monkeypatch.setattr(triton_gemv, "pdl_launch", lambda x: calls.append(1) or real(x))
    with_pdl = graph_decode_logits(model, ids, mask, 16)
    assert calls and real(ids), "no GEMV was launched with PDL"
    monkeypatch.setattr(triton_moe, "PDL", False)
    without = graph_decode_logits(model, ids, mask, 16)
    for i, (a, b) in enumerate(zip(with_pdl, without)):
        assert torch.equal(a, b), f"step {i}"


@pytest.mark.parametrize("batch", [1, 2])
def test_shared_expert_ahead_changes_no_bit(monkeypatch, batch: int) -> None:
    """The expert up-projection launched behind the route kernel with PDL (its shared-expert programs run
    before the routing is known, the routed ones wait for it): the same logits, bit for bit, as with an
    ordinary launch, at every step of a captured decode (batch 2: the second row left-padded)."""
    pytest.importorskip("triton")
    from nemotron_core.create import build_config, random_model
    from nemotron_core.ops import triton_experts, triton_moe

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    model = random_model(build_config("tiny"), torch.bfloat16, seed=1, device="cuda").eval()
    ids = torch.randint(3, 1000, (batch, 40), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    mask = torch.ones(batch, 20, dtype=torch.long, device="cuda")
    mask[batch - 1, :batch - 1] = 0
    launches = []
    real = triton_experts._gemv
    monkeypatch.setattr(triton_experts, "_gemv", lambda *a, **k: launches.append(k.get("pdl")) or real(*a, **k))
    ahead = graph_decode_logits(model, ids, mask, 16)
    assert True in launches, "no expert GEMV was launched with PDL"
    monkeypatch.setattr(triton_experts, "SHARED_AHEAD", False)
    launches.clear()
    plain = graph_decode_logits(model, ids, mask, 16)
    assert launches and True not in launches
    assert triton_moe.PDL
    for i, (a, b) in enumerate(zip(ahead, plain)):
        assert torch.equal(a, b), f"step {i}"


def test_route_launched_early_changes_no_bit(monkeypatch) -> None:
    """The route kernel launched with PDL behind the router's partial-logit kernel (which signals it at its
    start; route waits before reading): the same logits, bit for bit, as with ordinary launches."""
    pytest.importorskip("triton")
    from nemotron_core.create import build_config, random_model
    from nemotron_core.ops import triton_moe

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    model = random_model(build_config("tiny"), torch.bfloat16, seed=2, device="cuda").eval()
    ids = torch.randint(3, 1000, (1, 40), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    mask = torch.ones(1, 20, dtype=torch.long, device="cuda")
    calls = count_calls(monkeypatch, triton_moe, "route_triton")
    early = graph_decode_logits(model, ids, mask, 16)
    assert calls and triton_moe.pdl_launch(ids), "the route kernel was not launched with PDL"
    monkeypatch.setattr(triton_moe, "ROUTE_PDL", False)
    plain = graph_decode_logits(model, ids, mask, 16)
    for i, (a, b) in enumerate(zip(early, plain)):
        assert torch.equal(a, b), f"step {i}"


def test_mamba_step_launched_early_changes_no_bit(monkeypatch) -> None:
    """The fused Mamba step launched with PDL behind in_proj's split-K GEMV (which signals at its start):
    it loads the SSM state before waiting, and the logits stay bit-identical to ordinary launches."""
    pytest.importorskip("triton")
    from nemotron_core.create import build_config, random_model
    from nemotron_core.ops import triton_gemv, triton_mamba_step, triton_moe

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    model = random_model(build_config("tiny"), torch.bfloat16, seed=3, device="cuda").eval()
    model.model.backend.linear = "triton"
    monkeypatch.setattr(triton_gemv, "PRELOAD", False)  # in_proj on the split-K kernel, which signals
    monkeypatch.setattr(triton_mamba_step, "ENABLED", True)
    ids = torch.randint(3, 1000, (1, 40), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    mask = torch.ones(1, 20, dtype=torch.long, device="cuda")
    calls = count_calls(monkeypatch, triton_mamba_step, "mamba_step")
    early = graph_decode_logits(model, ids, mask, 16)
    assert calls and triton_moe.pdl_launch(ids)
    monkeypatch.setattr(triton_mamba_step, "EARLY", False)
    plain = graph_decode_logits(model, ids, mask, 16)
    for i, (a, b) in enumerate(zip(early, plain)):
        assert torch.equal(a, b), f"step {i}"
