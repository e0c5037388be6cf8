"""Helpers shared by the GPU tests."""
from __future__ import annotations

import importlib

import pytest
import torch


def triton_ops(name: str):
    """The module ``nemotron_core.ops.<name>`` (a Triton kernel module); skips the test without triton."""
    pytest.importorskip("triton")
    return importlib.import_module(f"nemotron_core.ops.{name}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` (b is the reference)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def graph_decode_logits(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Logits of a prefill of ``ids[:, :P]`` (``mask`` ``[B, P]``) and then ``steps`` decode steps feeding
    ``ids[:, P + i]``, from a decoder whose step runs as a captured CUDA graph."""
    from nemotron_core.generation import Decoder

    b, p = mask.shape
    dec = Decoder(model, batch_size=b, max_length=p + steps + 4, cuda_graph=True)
    with torch.no_grad():
        logits = [dec.prefill(ids[:, :p], mask)]
        logits += [dec.step(ids[:, p + i]).clone() for i in range(steps)]
    assert dec.graph is not None, "the decode step was not captured"
    return logits


def count_calls(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a wrapper that appends to the returned list on every call."""
    calls: list = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def check_switch_keeps_decode_logits(monkeypatch, ops, kernel: str, pad: int) -> None:
    """The tiny preset in fp32 (two rows, the second left-padded by ``pad``), decoded from a CUDA graph with
    ``ops.ENABLED`` True and then False: the first takes ``ops.<kernel>``, the second does not, and
    every step's logits agree to fp32 rounding."""
    from nemotron_core.create import build_config, random_model

    model = random_model(build_config("tiny"), torch.float32, seed=0, device="cuda").eval()
    ids = torch.randint(3, 1000, (2, 40), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    mask = torch.ones(2, 20, dtype=torch.long, device="cuda")
    mask[1, :pad] = 0
    calls = count_calls(monkeypatch, ops, kernel)
    monkeypatch.setattr(ops, "ENABLED", True)
    with_kernel = graph_decode_logits(model, ids, mask, 20)
    assert calls, f"the decode step did not take {kernel}"
    monkeypatch.setattr(ops, "ENABLED", False)
    calls.clear()
    without = graph_decode_logits(model, ids, mask, 20)
    assert not calls
    for i, (a, b) in enumerate(zip(with_kernel, without)):
        assert rel(a, b) <= 1e-4, f"step {i}"
