"""The fused Mamba2 decode step (``nemotron_core.ops.triton_mamba_step``) against its reference, on CPU
through Triton's interpreter: output and both updated states, fp32 (only the order of fp32 sums
differs: 1e-5 relative) and bf16, several rows, head blocks and conv widths, repeated calls (the
counters reset), dt limits."""
from __future__ import annotations

import pytest
import torch

from triton_cpu import DEVICE, require_triton

require_triton()

import tiny  # noqa: E402
from nemotron_core.ops import triton_mamba_step as ops  # noqa: E402


def _inputs(bsz: int, heads: int, groups: int, p: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d_inner = heads * p
    conv_dim = d_inner + 2 * groups * n

    def r(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(DEVICE)

    zx = r(bsz, 2 * d_inner + 2 * groups * n + heads)
    conv_state = r(bsz, conv_dim, k - 1)
    ssm_state = r(bsz, heads, p, n, dt=torch.float32)
    weights = dict(conv_weight=r(conv_dim, k, scale=0.5), conv_bias=r(conv_dim, scale=0.1),
                   A=-torch.rand(heads, generator=g).add(0.5).to(DEVICE), D=r(heads, dt=torch.float32),
                   dt_bias=r(heads, scale=0.5, dt=torch.float32), norm_weight=r(d_inner, scale=0.2).add(1.0))
    return zx, conv_state, ssm_state, weights


def _run(fn, zx, conv_state, ssm_state, weights, dt_limit, groups, **kw):
    cs, ss = conv_state.clone(), ssm_state.clone()
    out = fn(zx, cs, weights["conv_weight"], weights["conv_bias"], ss, weights["A"], weights["D"], weights["dt_bias"],
             dt_limit, weights["norm_weight"], 1e-5, groups, **kw)
    return out, cs, ss


@pytest.mark.parametrize("bsz,heads,groups,p,n,k,block_p", [
    (1, 8, 2, 16, 16, 4, 16), (1, 8, 2, 32, 16, 4, 16), (3, 4, 1, 16, 32, 4, None), (2, 8, 4, 16, 16, 3, 16),
    (1, 4, 2, 16, 16, 2, None)])
def test_matches_reference_fp32(bsz, heads, groups, p, n, k, block_p) -> None:
    zx, cs, ss, w = _inputs(bsz, heads, groups, p, n, k, torch.float32)
    want = _run(ops.mamba_step_reference, zx, cs, ss, w, (0.0, float("inf")), groups)
    for _ in range(2):  # the counters are back at zero after a call: the second call agrees
        got = _run(ops.mamba_step, zx, cs, ss, w, (0.0, float("inf")), groups, block_p=block_p)
        for name, a, b in zip(("out", "conv_state", "ssm_state"), want, got):
            assert tiny.rel_err(a, b) <= 1e-5, name
    assert int(ops._counters(torch.device(DEVICE))[:bsz * groups].abs().sum()) == 0


def test_dt_limit_and_bf16() -> None:
    """bf16 activations and conv weights with an fp32 SSM state, dt clamped: against the reference run
    on the same values in fp32 (rounded where the kernel rounds), within a few bf16 ulps."""
    zx, cs, ss, w = _inputs(2, 8, 2, 16, 16, 4, torch.bfloat16, seed=1)
    limit = (0.05, 0.5)
    got = _run(ops.mamba_step, zx, cs, ss, w, limit, 2)
    w32 = {name: t.float() for name, t in w.items()}
    out32, cs32, ss32 = _run(ops.mamba_step_reference, zx.float(), cs.float(), ss, w32, limit, 2)
    assert got[0].dtype == torch.bfloat16 and tiny.rel_err(out32, got[0].float()) <= 2e-2
    assert torch.equal(got[1].float(), cs32)  # the conv state only moves values
    assert tiny.rel_err(ss32, got[2]) <= 1e-2
    # Unclamped, the same inputs give a different state: the limit was applied.
    assert tiny.rel_err(_run(ops.mamba_step, zx, cs, ss, w, (0.0, float("inf")), 2)[2], got[2]) > 1e-3


def test_supported() -> None:
    zx, cs, ss, w = _inputs(1, 8, 2, 16, 16, 4, torch.float32)
    assert ops.supported(zx, cs, ss, w["conv_weight"], 2)
    assert not ops.supported(zx, cs, ss, w["conv_weight"], 3)  # heads not divisible into groups
    assert not ops.supported(zx[:, :-1], cs, ss, w["conv_weight"], 2)  # a width that does not add up
    _, cs5, _, w5 = _inputs(1, 8, 2, 16, 16, 5, torch.float32)
    assert not ops.supported(zx, cs5, ss, w5["conv_weight"], 2)  # five taps
    with pytest.raises(ValueError):
        ops.mamba_step(zx, cs5, w5["conv_weight"], None, ss, w["A"], w["D"], w["dt_bias"], (0.0, float("inf")),
                       w["norm_weight"], 1e-5, 2)
