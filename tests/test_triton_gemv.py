"""The split-K decode GEMV (``nemotron_core.ops.triton_gemv``) against its reference, on CPU through
Triton's interpreter (fp32: the kernel's products are exact there and only the order of the fp32
sums differs, so 1e-6 relative catches any wrong index, split or missing partial)."""
from __future__ import annotations

import pytest
import torch

from triton_cpu import DEVICE, require_triton

require_triton()

import tiny  # noqa: E402
from nemotron_core.ops import triton_gemv  # noqa: E402

CONFIGS = [{"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT": s, "num_warps": 4, "num_stages": 2} for s in (1, 2, 3)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"split{c['SPLIT']}")
@pytest.mark.parametrize("epilogue", ["none", "residual", "relu2"])
def test_gemv_matches_reference(config, epilogue: str) -> None:
    g = torch.Generator().manual_seed(config["SPLIT"])
    k = 100  # not a multiple of the splits or of BLOCK_K: partial ranges
    w = torch.randn(40, k, generator=g).to(DEVICE)  # 40 rows: a partial row block
    x = torch.randn(1, 1, k, generator=g).to(DEVICE)
    res = torch.randn(1, 1, 40, generator=g).to(DEVICE) if epilogue == "residual" else None
    relu2 = epilogue == "relu2"
    want = triton_gemv.gemv_reference(x, w, res, relu2=relu2)
    for _ in range(2):  # the counters are back at zero after a call: the second call agrees
        got = triton_gemv.gemv(x, w, res, relu2=relu2, config=config)
        assert got.shape == (1, 1, 40) and tiny.rel_err(want, got) <= 1e-6
    assert int(triton_gemv._counters(torch.device(DEVICE))[:3].abs().sum()) == 0


def test_gemv_default_config_and_supported() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g).to(DEVICE)
    x = torch.randn(64, generator=g).to(DEVICE)
    assert tiny.rel_err(triton_gemv.gemv_reference(x, w), triton_gemv.gemv(x, w)) <= 1e-6
    assert not triton_gemv.supported(torch.randn(2, 64).to(DEVICE), w)  # two rows
    assert not triton_gemv.supported(x.double(), w.double())
    with pytest.raises(ValueError, match="one row"):
        triton_gemv.gemv(torch.randn(2, 64).to(DEVICE), w)
