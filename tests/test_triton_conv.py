"""Triton causal conv1d kernels against the plain-PyTorch reference (``ops.conv``).

Runs on the CPU through Triton's interpreter (switched on by ``conftest.py``; see ``triton_cpu.py``)
and is skipped when Triton is not installed. Everything is fp32 with fixed seeds; outputs
and gradients must match to 1e-5 relative to the reference's largest magnitude (the kernels
accumulate in fp32 in another order than the reference, so a few ulps apart).

Shapes are small (the interpreter is slow) but chosen so the tiny block sizes used by most tests
(8 positions x 16 channels) give several position blocks, a partial channel block, and document
boundaries that don't fall on block edges.
"""
from __future__ import annotations

import pytest
import torch

from triton_cpu import DEVICE, require_triton

require_triton()

from nemotron_core.ops import triton_conv  # noqa: E402
from nemotron_core.ops.conv import causal_conv1d, causal_conv1d_step  # noqa: E402
from nemotron_core.ops.triton_conv import (  # noqa: E402
    causal_conv1d_triton,
    causal_conv1d_update_triton,
    supported,
)

RTOL = 1e-5
B, S, C = 2, 37, 24


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny blocks, so the halos, the partial-block masks and the partial sums all get exercised,
    and two blocks per backward program (the last program's second block lies past the end)."""
    monkeypatch.setattr(triton_conv, "_launch_config", lambda channels, dtype, which: (16, 8, 1))
    monkeypatch.setattr(triton_conv, "_BWD_TARGET_PROGRAMS", 8)


def _inputs(k: int = 4, seed: int = 0, bias: bool = True, s: int = S):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, s, C, generator=gen)
    w = torch.randn(C, k, generator=gen) * 0.5
    b = torch.randn(C, generator=gen) if bias else None
    state = torch.randn(B, C, k - 1, generator=gen)
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return move(x), move(w), move(b), move(state)


def _three_docs(s: int = S) -> torch.Tensor:
    """Three documents per row, boundaries off the 8-position block edges (and off each other)."""
    seq = torch.zeros(B, s, dtype=torch.int32)
    seq[0, 10:], seq[0, 25:] = 1, 2
    seq[1, 3:], seq[1, 20:] = 1, 2
    return seq.to(DEVICE)


def _check(x, w, b, seq=None, state=None) -> None:
    out, final = causal_conv1d_triton(x, w, b, seq, state)
    ref_out, ref_final = causal_conv1d(x, w, b, seq, state)
    assert out.shape == ref_out.shape and out.dtype == x.dtype and out.is_contiguous()
    assert final.shape == ref_final.shape
    assert rel(out, ref_out) < RTOL
    assert rel(final, ref_final) < RTOL


@pytest.mark.parametrize("k", [2, 3, 4])
def test_plain_matches_reference(small_blocks, k: int) -> None:
    x, w, b, _ = _inputs(k)
    _check(x, w, b)


def test_default_blocks_match_reference() -> None:
    x, w, b, state = _inputs()
    _check(x, w, b)
    _check(x, w, b, _three_docs(), state)


@pytest.mark.parametrize("with_state", [False, True])
def test_seq_idx_matches_reference(small_blocks, with_state: bool) -> None:
    x, w, _, state = _inputs()
    _check(x, w, None, _three_docs(), state if with_state else None)


@pytest.mark.parametrize("k", [3, 4])
def test_initial_state_matches_reference(small_blocks, k: int) -> None:
    x, w, b, state = _inputs(k)
    _check(x, w, b, None, state)


@pytest.mark.parametrize("with_state", [False, True])
def test_sequence_shorter_than_window(small_blocks, with_state: bool) -> None:
    """S < K-1: the final state still holds K-1 inputs, part of them from initial_state."""
    x, w, b, state = _inputs(s=2)
    _check(x, w, b, None, state if with_state else None)


def test_strided_input(small_blocks) -> None:
    """x as a slice of a wider projection, the way in_proj(x).split(...) hands it over."""
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(B, S, 3 * C + 5, generator=gen).to(DEVICE)
    x = wide[..., C + 5: 2 * C + 5]
    assert not x.is_contiguous() and x.stride(-1) == 1
    _, w, b, state = _inputs()
    _check(x, w, b)
    _check(x, w, b, _three_docs(), state)


def test_seq_idx_masking_matters(small_blocks) -> None:
    """Packing must change the output right after a boundary, and each document must come out as
    if it had been run alone."""
    x, w, b, _ = _inputs()
    seq = _three_docs()
    packed, _ = causal_conv1d_triton(x, w, b, seq)
    unpacked, _ = causal_conv1d_triton(x, w, b)
    assert torch.equal(packed[0, :10], unpacked[0, :10])  # first document: nothing to mask
    assert (packed[0, 10:13] - unpacked[0, 10:13]).abs().min() > 0  # taps that cross 9|10
    alone, _ = causal_conv1d_triton(x[:1, 10:25].contiguous(), w, b)
    assert rel(packed[:1, 10:25], alone) < RTOL


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_match_reference(small_blocks, packed: bool) -> None:
    x, w, b, state = _inputs(seed=2)
    seq = _three_docs() if packed else None
    if packed:
        state = None
    gen = torch.Generator().manual_seed(3)
    dout = torch.randn(B, S, C, generator=gen).to(DEVICE)
    grads = []
    for fn in (causal_conv1d_triton, causal_conv1d):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        out, _ = fn(*leaves, seq, state)
        grads.append(torch.autograd.grad(out, leaves, dout))
    for name, got, want in zip(("dx", "dweight", "dbias"), *grads):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert rel(got, want) < RTOL, name


def test_gradients_with_initial_state_and_strided_x(small_blocks) -> None:
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(B, S, 2 * C, generator=gen).to(DEVICE)
    _, w, _, state = _inputs(seed=5)
    dout = torch.randn(B, S, C, generator=gen).to(DEVICE)
    grads = []
    for fn in (causal_conv1d_triton, causal_conv1d):
        wide_leaf, w_leaf = wide.clone().requires_grad_(), w.clone().requires_grad_()
        out, _ = fn(wide_leaf[..., C:], w_leaf, None, _three_docs(), state)
        grads.append(torch.autograd.grad(out, (wide_leaf, w_leaf), dout))
    assert rel(grads[0][0], grads[1][0]) < RTOL
    assert rel(grads[0][1], grads[1][1]) < RTOL


@pytest.mark.parametrize("k", [2, 4])
def test_update_matches_reference_step(k: int) -> None:
    gen = torch.Generator().manual_seed(6)
    _, w, b, state = _inputs(k)
    ours, ref = state.clone(), state.clone()
    for _ in range(5):
        wide = torch.randn(B, 3 * C, generator=gen).to(DEVICE)
        x = wide[:, C: 2 * C]  # strided, as xbc[:, 0] of the projection is
        out = causal_conv1d_update_triton(x, ours, w, b)
        ref_out = causal_conv1d_step(x, ref, w, b)
        assert out.shape == (B, C) and out.dtype == x.dtype
        assert rel(out, ref_out) < RTOL
        assert torch.equal(ours, ref)


def test_prefill_then_decode_continues_the_sequence(small_blocks) -> None:
    """Prefill's final state fed to decode steps == running the whole sequence at once."""
    x, w, b, _ = _inputs()
    full, _ = causal_conv1d(x, w, b)
    out, final = causal_conv1d_triton(x[:, :30], w, b)
    state = final.clone()
    steps = [causal_conv1d_update_triton(x[:, t], state, w, b) for t in range(30, S)]
    assert rel(torch.cat([out, torch.stack(steps, 1)], 1), full) < RTOL


def test_supported() -> None:
    x, w, _, _ = _inputs()
    assert supported(x, w)
    assert not supported(x.transpose(1, 2), w)  # channels not contiguous
    assert not supported(x, torch.randn(C, 5))  # wider than the kernels keep in registers
