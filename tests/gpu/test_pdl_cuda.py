"""Programmatic dependent launch in the captured decode step: the output projections' register-preload
GEMV, in_proj's split-K GEMV, the fused Mamba step, and the MoE block's route kernel and expert
projections start while the kernel before them runs; nothing they read early may change, so the
logits must be bit-identical with PDL on and off, and with each early launch on and off."""
from __future__ import annotations

import pytest
import torch

from .common import count_calls, graph_decode_logits, triton_ops

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


# Each early launch (module, switch, what it moves, and the call that must happen with the switch on),
# toggled alone. The tiny preset at bf16; in_proj on the split-K GEMV (the preload kernel would take its
# power-of-two width), which signals the fused Mamba step.
EARLY_SWITCHES = {
    "shared_ahead": ("triton_experts", "SHARED_AHEAD", "the expert up-projection's shared part runs during "
                     "the routing; the routed part waits for it", "_gemv"),
    "down_early": ("triton_experts", "DOWN_EARLY", "the expert down-projection loads its first weight tile "
                   "while the up-projection finishes", "_gemv"),
    "route_pdl": ("triton_moe", "ROUTE_PDL", "the route kernel starts while the router's partial logits "
                  "are computed", "route_triton"),
    "mamba_early": ("triton_mamba_step", "EARLY", "the fused Mamba step loads its SSM state while in_proj "
                    "runs", "mamba_step"),
    "gemv_early": ("triton_gemv", "EARLY", "in_proj's split-K GEMV loads its first weight tile while the "
                   "MoE combine before it runs", "gemv"),
    "gemv_early_tiles": ("triton_gemv", "EARLY_TILES", "in_proj's split-K GEMV loads its first four weight "
                         "tiles (as one) while the MoE combine before it runs", "gemv"),
}
# The settings of a switch that is not a flag: (on, off).
SETTINGS = {"gemv_early_tiles": (4, 1)}


@pytest.mark.parametrize("switch,batch", [(name, batch) for name in sorted(EARLY_SWITCHES) for batch in (1, 2)
                                          if not (name.startswith("gemv_early") and batch > 1)])  # (one row)
def test_early_launch_changes_no_bit(monkeypatch, switch: str, batch: int) -> None:
    """A kernel launched with programmatic dependent launch so that it starts before the one ahead of it
    ends (see EARLY_SWITCHES) reads early only what that kernel does not write, and stores only after
    waiting: every step's logits of a captured decode are bit-identical with the switch on and off
    (batch 2: the second row left-padded)."""
    module_name, attr, _, entry = EARLY_SWITCHES[switch]
    module = triton_ops(module_name)
    from nemotron_core.create import build_config, random_model
    from nemotron_core.ops import triton_gemv, triton_mamba_step, triton_moe

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    model = random_model(build_config("tiny"), torch.bfloat16, seed=1, device="cuda").eval()
    model.model.backend.linear = "triton"
    monkeypatch.setattr(triton_gemv, "PRELOAD", False)
    monkeypatch.setattr(triton_mamba_step, "ENABLED", True)
    ids = torch.randint(3, 1000, (batch, 40), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    mask = torch.ones(batch, 20, dtype=torch.long, device="cuda")
    mask[batch - 1, :batch - 1] = 0
    on, off = SETTINGS.get(switch, (True, False))
    monkeypatch.setattr(module, attr, on)
    calls = count_calls(monkeypatch, module, entry)
    early = graph_decode_logits(model, ids, mask, 16)
    assert calls and triton_moe.pdl_launch(ids), f"{entry} was not called"
    monkeypatch.setattr(module, attr, off)
    plain = graph_decode_logits(model, ids, mask, 16)
    for i, (a, b) in enumerate(zip(early, plain)):
        assert torch.equal(a, b), f"step {i}"
