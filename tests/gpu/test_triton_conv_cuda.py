"""Triton causal conv1d kernels against the plain-PyTorch reference on CUDA, at a realistic size.

    python -m pytest tests/gpu/test_triton_conv_cuda.py -q -s

References are computed in float64 on upcast copies of the very same inputs, so the comparison
measures only the kernels' own rounding (and cuDNN's TF32, allowed by default for convolutions,
cannot blur the reference). Tolerances, relative to the reference's largest magnitude:
  * fp32: 1e-4. The kernels do plain fp32 FMAs (no TF32 or other reduced-precision math), so the
    only differences are summation order, orders of magnitude below that.
  * bf16: 1e-2. The outputs are rounded to bf16 (8 mantissa bits, up to ~4e-3 relative per
    element); the arithmetic itself is fp32.
"""
from __future__ import annotations

import pytest
import torch

from .common import triton_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

B, S, C, K = 1, 1000, 6144, 4
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _ops():
    return triton_ops("triton_conv")


def _inputs(dtype: torch.dtype, weight_dtype: torch.dtype, seed: int, s: int = S, strided: bool = False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=gen)  # noqa: E731
    if strided:  # the xBC slice of an in_proj output: rows strided, channels contiguous
        x = r(B, s, 2 * C + 128)[..., C + 64: 2 * C + 64].to(dtype)
    else:
        x = r(B, s, C).to(dtype)
    w = (r(C, K) * 0.5).to(weight_dtype)
    bias = r(C).to(weight_dtype)
    state = r(B, C, K - 1).to(dtype)
    seq = torch.zeros(B, s, dtype=torch.int32, device="cuda")
    seq[:, 301:] += 1  # three documents, boundaries off any block edge
    seq[:, 777:] += 1
    return x, w, bias, state, seq


def _ref64(x, w, bias, seq, state):
    up = lambda t: None if t is None else t.double()  # noqa: E731
    from nemotron_core.ops.conv import causal_conv1d

    return causal_conv1d(up(x), up(w), up(bias), seq, up(state))


CASES = [  # (x dtype, weight dtype): mixed precision with fp32 master weights is the training case
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32),
]


@pytest.mark.parametrize("dtype,weight_dtype", CASES)
@pytest.mark.parametrize("packed,with_state,strided", [
    (False, False, False), (True, False, False), (False, True, False), (True, True, True)])
def test_forward_matches_reference(dtype, weight_dtype, packed: bool, with_state: bool, strided: bool) -> None:
    ops = _ops()
    x, w, bias, state, seq = _inputs(dtype, weight_dtype, seed=0, strided=strided)
    seq = seq if packed else None
    state = state if with_state else None
    out, final = ops.causal_conv1d_triton(x, w, bias, seq, state)
    ref_out, ref_final = _ref64(x, w, bias, seq, state)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == x.shape
    assert rel(out, ref_out) < TOL[dtype]
    assert torch.equal(final.double(), ref_final)  # a copy of inputs: exact


@pytest.mark.parametrize("dtype,weight_dtype", CASES)
@pytest.mark.parametrize("packed", [False, True])
def test_gradients_match_reference(dtype, weight_dtype, packed: bool) -> None:
    ops = _ops()
    x, w, bias, state, seq = _inputs(dtype, weight_dtype, seed=1, strided=packed)
    seq = seq if packed else None
    dout = torch.randn(x.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)).to(dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, bias)]
    out, _ = ops.causal_conv1d_triton(*leaves, seq, state)
    got = torch.autograd.grad(out, leaves, dout)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, bias)]
    ref_out, _ = _ref64(*leaves64, seq, state)
    want = torch.autograd.grad(ref_out, leaves64, dout.double())
    for name, g, leaf, ref in zip(("dx", "dweight", "dbias"), got, leaves, want):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        assert rel(g, ref) < TOL[dtype], name


def test_backward_is_deterministic() -> None:
    ops = _ops()
    x, w, bias, _, seq = _inputs(torch.bfloat16, torch.float32, seed=3)
    dout = torch.randn_like(x)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, bias)]
        out, _ = ops.causal_conv1d_triton(*leaves, seq)
        runs.append(torch.autograd.grad(out, leaves, dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,weight_dtype", CASES)
def test_update_matches_reference_step(dtype, weight_dtype) -> None:
    ops = _ops()
    from nemotron_core.ops.conv import causal_conv1d_step

    _, w, bias, state, _ = _inputs(dtype, weight_dtype, seed=4)
    ours, ref = state.clone(), state.clone()
    gen = torch.Generator(device="cuda").manual_seed(5)
    for _ in range(6):
        x = torch.randn(4, 2 * C, device="cuda", generator=gen)[:1, C // 2: C // 2 + C].to(dtype)
        out = ops.causal_conv1d_update_triton(x, ours, w, bias)
        ref_out = causal_conv1d_step(x.double(), ref.double(), w.double(), bias.double())
        ref.copy_(torch.cat([ref[..., 1:], x.unsqueeze(-1)], -1))
        assert out.dtype == dtype
        assert rel(out, ref_out) < TOL[dtype]
        assert torch.equal(ours, ref)


def test_update_in_cuda_graph() -> None:
    """Decode replays the step from a CUDA graph: the kernel must capture and update in place."""
    ops = _ops()
    from nemotron_core.ops.conv import causal_conv1d_step

    _, w, bias, state, _ = _inputs(torch.bfloat16, torch.float32, seed=6)
    x = torch.randn(B, C, device="cuda", dtype=torch.bfloat16)
    ops.causal_conv1d_update_triton(x, state.clone(), w, bias)  # compile outside the capture
    ref = state.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.causal_conv1d_update_triton(x, state, w, bias)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert rel(out, causal_conv1d_step(x, ref, w, bias)) < TOL[torch.bfloat16]
        assert torch.equal(state, ref)


def test_timing_report(capsys) -> None:
    """Not an assertion: prints forward+backward ms of Triton vs the F.conv1d reference."""
    ops = _ops()
    from triton.testing import do_bench

    from nemotron_core.ops.conv import causal_conv1d

    s = 8192
    rows = []
    for weight_dtype in (torch.bfloat16, torch.float32):
        x, w, bias, _, _ = _inputs(torch.bfloat16, weight_dtype, seed=7, s=s)
        dout = torch.randn_like(x)
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, bias)]

        def step(fn, backward: bool):
            out, _ = fn(*leaves)
            if backward:
                torch.autograd.grad(out, leaves, dout)

        for name, fn in (("triton", ops.causal_conv1d_triton), ("F.conv1d reference", causal_conv1d)):
            fwd = do_bench(lambda: step(fn, False), warmup=50, rep=300, return_mode="median")
            both = do_bench(lambda: step(fn, True), warmup=50, rep=300, return_mode="median")
            rows.append(f"  {name:>18}, {str(weight_dtype)[6:]:>8} weights: forward {fwd:.3f} ms, "
                        f"forward+backward {both:.3f} ms")
    with capsys.disabled():
        print(f"\ncausal conv1d, B={B} S={s} C={C} K={K}, bf16 activations, median of do_bench:")
        print("\n".join(rows))
