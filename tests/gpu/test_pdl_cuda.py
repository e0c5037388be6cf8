"""Programmatic dependent launch in the captured decode step: the output projections' register-preload
GEMV starts while the kernel before it runs; nothing it reads early may change, so the logits must be
bit-identical with PDL on and off."""
from __future__ import annotations

import pytest
import torch

from .common import graph_decode_logits

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
