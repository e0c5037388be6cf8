"""The split-K decode GEMV on the GPU at the Nano model's single-row projections, in bf16, against an
fp32 reference and against cuBLAS's own error (run on a CUDA machine; skipped elsewhere)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .common import rel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPES = {"mamba in_proj": (10304, 2688), "out_proj": (2688, 4096), "qkv": (4608, 2688), "lm_head": (131072, 2688)}


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("residual", [False, True])
def test_gemv_as_accurate_as_cublas(name: str, residual: bool) -> None:
    from nemotron_core.ops import triton_gemv

    n, k = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(n)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
    res = torch.randn(1, n, device="cuda", generator=g).bfloat16() if residual else None
    exact = x.float() @ w.float().t() + (res.float() if residual else 0)
    cublas = torch.addmm(res, x, w.t()) if residual else F.linear(x, w)
    got = triton_gemv.gemv(x, w, res)
    assert got.dtype == torch.bfloat16 and got.shape == (1, n)
    # One rounding of an fp32 sum: within bf16's half-ulp of the exact result, like cuBLAS.
    assert rel(got, exact) <= max(2 * rel(cublas, exact), 4e-3)
    assert torch.equal(got, triton_gemv.gemv(x, w, res))  # deterministic (fixed reduction order)


def test_gemv_replays_in_a_cuda_graph() -> None:
    """The split-K counters return to zero after each call, so graph replays keep giving the result."""
    from nemotron_core.ops import triton_gemv

    g = torch.Generator(device="cuda").manual_seed(1)
    w = (torch.randn(2688, 4096, device="cuda", generator=g) * 0.02).bfloat16()
    x = torch.randn(1, 4096, device="cuda", generator=g).bfloat16()
    res = torch.randn(1, 2688, device="cuda", generator=g).bfloat16()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            triton_gemv.gemv(x, w, res)  # autotune and compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_gemv.gemv(x, w, res)
    for _ in range(3):
        x.copy_(torch.randn(1, 4096, device="cuda", generator=g).bfloat16())
        graph.replay()
        assert torch.equal(out, triton_gemv.gemv(x, w, res))
