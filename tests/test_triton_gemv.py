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


def test_linear_policy_sends_only_what_measured_faster() -> None:
    """``linear="auto"`` (the default) takes the GEMV on CUDA only, for the shapes where it beat cuBLAS
    on the H200; "triton" for every single row (here the interpreter stands in for the GPU); "torch"
    never; autograd and several rows never."""
    from nemotron_core.backend import BackendConfig
    from nemotron_core.modeling.linear import gemv_pays, takes_gemv

    assert BackendConfig().linear == "auto"
    assert gemv_pays(10304, 2688) and gemv_pays(2688, 4096) and gemv_pays(131072, 2688)
    assert not gemv_pays(4608, 2688)  # the fused q/k/v: cuBLAS was faster
    x, w = torch.randn(1, 64).to(DEVICE), torch.randn(48, 64).to(DEVICE)
    with torch.no_grad():
        assert takes_gemv(BackendConfig(linear="triton"), x, w)
        assert not takes_gemv(BackendConfig(linear="torch"), x, w)
        assert not takes_gemv(BackendConfig(linear="triton"), torch.randn(2, 64).to(DEVICE), w)
        assert takes_gemv(BackendConfig(), x, w) == (x.is_cuda and gemv_pays(48, 64))  # False: small, or CPU
    assert not takes_gemv(BackendConfig(linear="triton"), x, w)  # autograd on


@pytest.mark.parametrize("epilogue", ["none", "residual", "relu2"])
def test_register_preload_kernel(epilogue: str) -> None:
    """Shapes whose weight slice fits a program's registers take ``gemv_preload`` (split 4 here: K = 4096 in
    fp32, 16 rows of 1024 a program): same results as the reference, counters reset; other shapes keep
    the split-K kernel (``preload_split`` 0)."""
    assert triton_gemv.preload_split(40, 4096, 4) == 4
    assert triton_gemv.preload_split(2688, 4096, 2) == 2  # the Nano out_proj and o_proj in bf16
    assert triton_gemv.preload_split(10304, 2688, 2) == 0  # K = 2688 has no power-of-two slice
    g = torch.Generator().manual_seed(7)
    w = torch.randn(40, 4096, generator=g).to(DEVICE)
    x = torch.randn(1, 1, 4096, generator=g).to(DEVICE)
    res = torch.randn(1, 1, 40, generator=g).to(DEVICE) if epilogue == "residual" else None
    want = triton_gemv.gemv_reference(x, w, res, relu2=epilogue == "relu2")
    for _ in range(2):
        got = triton_gemv.gemv(x, w, res, relu2=epilogue == "relu2")
        assert tiny.rel_err(want, got) <= 1e-6
    assert int(triton_gemv._counters(torch.device(DEVICE))[:3].abs().sum()) == 0


def test_wide_projections_take_the_pinned_config_on_sm90(monkeypatch) -> None:
    # in_proj (10304 outputs) and the LM head on an H100/H200 take the config measured in the model,
    # not whichever of two close configs the autotuner timed faster in this process; narrower
    # projections, other architectures, the CPU and PIN off keep the autotuner.
    from nemotron_core.ops import triton_moe

    monkeypatch.setattr(triton_moe, "interpreting", lambda: False)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert triton_gemv.pinned_config(cuda, 10304) == triton_gemv.PINNED[(9, 0)]
    assert triton_gemv.pinned_config(cuda, 10304)["SPLIT"] == 1
    assert triton_gemv.pinned_config(cuda, 4608) is None
    assert triton_gemv.pinned_config(torch.device("cpu"), 10304) is None
    monkeypatch.setattr(triton_gemv, "PIN", False)
    assert triton_gemv.pinned_config(cuda, 10304) is None
    monkeypatch.setattr(triton_gemv, "PIN", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert triton_gemv.pinned_config(cuda, 10304) is None
