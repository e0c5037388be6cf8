"""The fused cross-entropy (``nemotron_core.ops.triton_ce``) against torch's
``F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")`` and its autograd, on
CPU through Triton's interpreter (or on CUDA where there is one).

Tolerances, and why they are not zero:

* fp32 logits, loss and gradient at 1e-5 relative: both sides compute in fp32, but the kernel sums
  the exponentials block by block with an online max while torch reduces in its own order, and exp
  itself may differ in the last bit (numpy's exp under the interpreter, torch's vectorised exp; on a
  GPU, ex2.approx). A few fp32 ulps (~1e-7 each) on values that are summed over V = 1000 terms stay
  far below 1e-5.
* bf16/fp16 logits: the inputs are exact in fp32, so the loss is the same fp32 computation as above
  (checked at 1e-3 relative, as the contract says; it is in fact near 1e-6). The gradient is that
  fp32 gradient rounded once to the logits' dtype on both sides; the two fp32 values differ by a few
  fp32 ulps, so after rounding they are equal or, when they straddle a rounding boundary, one
  bf16/fp16 ulp apart. The bound checked is 1 ulp, counted on the bit patterns.

The block size is lowered to 256 for these tests (V = 1000 is then 3 full steps and a ragged one);
the interpreter is slow, so rows are few and short.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from triton_cpu import CUDA, DEVICE, require_triton

require_triton()

from nemotron_core.ops import triton_ce  # noqa: E402
from nemotron_core.ops.triton_ce import cross_entropy_sum  # noqa: E402

IGNORE = -100
TEST_BLOCK_V = 256


@pytest.fixture(autouse=True)
def small_block(monkeypatch):
    """A short block, read by the launch (BLOCK_V is a constexpr argument), so tiny rows take several
    steps and a ragged tail."""
    monkeypatch.setattr(triton_ce, "BLOCK_V", TEST_BLOCK_V)


def _logits(rows: int, vocab: int, dtype: torch.dtype, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * scale).to(dtype).to(DEVICE)


def _targets(rows: int, vocab: int, ignored: tuple[int, ...] = (), seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[list(ignored)] = IGNORE
    return t.to(DEVICE)


def _reference(logits: torch.Tensor, targets: torch.Tensor, g: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's loss and gradient; the gradient flows back through ``.float()`` into the logits' dtype."""
    x = logits.detach().requires_grad_(True)
    loss = F.cross_entropy(x.float(), targets, ignore_index=IGNORE, reduction="sum")
    loss.backward(torch.tensor(g, device=loss.device))
    return loss.detach(), x.grad


def _fused(logits: torch.Tensor, targets: torch.Tensor, g: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.detach().requires_grad_(True)
    loss = cross_entropy_sum(x, targets, ignore_index=IGNORE)
    loss.backward(torch.tensor(g, device=loss.device))
    return loss.detach(), x.grad


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """16-bit float bit patterns as integers consecutive in value order (+0 and -0 both 0): a
    difference of n is n ulps. Not for NaNs."""
    i = t.view(torch.int16).int()
    return torch.where(i < 0, -(i & 0x7FFF), i)


def _max_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((_ordered(a) - _ordered(b)).abs().max())


def _check(logits: torch.Tensor, targets: torch.Tensor, g: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused loss and gradient against torch's, at the tolerances of the module's docstring."""
    want_loss, want_grad = _reference(logits, targets, g)
    got_loss, got_grad = _fused(logits, targets, g)
    assert got_loss.dtype == torch.float32 and got_loss.dim() == 0
    assert got_grad.dtype == logits.dtype and got_grad.shape == logits.shape
    assert torch.isfinite(got_loss) and torch.isfinite(got_grad).all()
    if logits.dtype == torch.float32:
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        # atol for entries near zero (tiny softmax probabilities), where relative error means nothing.
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    else:
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-3, atol=1e-5)
        assert _max_ulps(want_grad, got_grad) <= 1
    return got_loss, got_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch(dtype: torch.dtype) -> None:
    """V = 1000 is not a multiple of the block: three full steps and a ragged one."""
    _check(_logits(5, 1000, dtype), _targets(5, 1000))


@pytest.mark.parametrize("vocab", [7, TEST_BLOCK_V, 2 * TEST_BLOCK_V + 1])
def test_vocab_sizes_around_the_block(vocab: int) -> None:
    """Shorter than one block, exactly one, and two plus one column."""
    _check(_logits(3, vocab, torch.bfloat16), _targets(3, vocab))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ignored_rows_get_no_loss_and_exactly_zero_gradient(dtype: torch.dtype) -> None:
    logits, targets = _logits(5, 1000, dtype), _targets(5, 1000, ignored=(0, 3))
    _, grad = _check(logits, targets)
    assert (grad[[0, 3]] == 0).all()
    assert (grad[[1, 2, 4]] != 0).any(dim=1).all()


def test_all_rows_ignored() -> None:
    logits, targets = _logits(4, 1000, torch.bfloat16), _targets(4, 1000, ignored=(0, 1, 2, 3))
    loss, grad = _check(logits, targets)
    assert loss.item() == 0.0
    assert (grad == 0).all()


def test_ignored_rows_stay_zero_under_an_infinite_gradient() -> None:
    """torch's gradient on an ignored row is exactly 0 whatever the incoming gradient is."""
    logits, targets = _logits(3, 300, torch.float32), _targets(3, 300, ignored=(1,))
    _, grad = _fused(logits, targets, float("inf"))
    assert (grad[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits_keep_exp_finite(dtype: torch.dtype) -> None:
    """Logits spread over +-80 (exp(80) overflows nothing in fp32 but exp(80) * 1000 terms sums near
    the edge, and exp(160) would overflow): the online max keeps every exponent <= 0. The largest
    logit of each row moves from block to block, so the running sum is rescaled on the way."""
    g = torch.Generator().manual_seed(3)
    logits = ((torch.rand(4, 1000, generator=g) * 2 - 1) * 80)
    logits[0, 999] = 80.0   # the max in the ragged last block
    logits[1, 0] = 80.0     # the max in the first block
    logits[2, 300] = -80.0  # the target's logit far below the max: a large loss
    logits[3] = -80.0       # a flat row at the bottom of the range
    targets = torch.tensor([999, 5, 300, 17])
    loss, _ = _check(logits.to(dtype).to(DEVICE), targets.to(DEVICE))
    assert loss.item() > 100  # row 2 alone contributes ~160


def test_a_row_stride_wider_than_the_vocabulary() -> None:
    """Rows of a wider tensor (unit stride along V, any row stride) are read in place."""
    wide = _logits(4, 1100, torch.bfloat16)
    logits = wide[:, 50:1050]
    assert logits.stride() == (1100, 1) and triton_ce.supported(logits)
    _check(logits, _targets(4, 1000))


def test_saves_the_logits_without_a_copy() -> None:
    logits = _logits(3, 500, torch.bfloat16).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cross_entropy_sum(logits, _targets(3, 500))
    assert saved[0].data_ptr() == logits.data_ptr()
    # The rest is the targets and the fp32 logsumexp per row: nothing of size V.
    assert [tuple(t.shape) for t in saved[1:]] == [(3,), (3,)]
    assert saved[2].dtype == torch.float32


def test_out_of_range_target_gives_nan_without_reading_out_of_bounds() -> None:
    """The caller validates targets; a bad one must still not read outside the row, and must show."""
    logits = _logits(3, 200, torch.float32)
    targets = torch.tensor([5, 200, -3], device=DEVICE)
    x = logits.detach().requires_grad_(True)
    loss = cross_entropy_sum(x, targets)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isfinite(x.grad[0]).all() and torch.isnan(x.grad[1:]).all()


def test_no_rows() -> None:
    x = torch.empty(0, 1000, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    loss = cross_entropy_sum(x, torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == x.shape


def test_int32_targets() -> None:
    """Widened to int64 on the way in: the same result as int64 targets (torch rejects int32)."""
    logits, targets = _logits(3, 300, torch.float32), _targets(3, 300, ignored=(1,))
    want_loss, want_grad = _fused(logits, targets, 0.7)
    got_loss, got_grad = _fused(logits, targets.to(torch.int32), 0.7)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)


def test_supported() -> None:
    ok = torch.zeros(2, 8, dtype=torch.bfloat16, device=DEVICE)
    assert triton_ce.supported(ok) is True
    assert triton_ce.supported(ok.float()) and triton_ce.supported(ok.half())
    assert not triton_ce.supported(ok.double())
    assert not triton_ce.supported(ok[None])          # not 2-D
    assert not triton_ce.supported(ok.t())            # stride along V is not 1
    assert not triton_ce.supported(ok[:, :0])         # no columns


@pytest.mark.skipif(CUDA, reason="CPU dispatch only")
def test_causal_lm_loss_keeps_the_torch_path_on_cpu(monkeypatch) -> None:
    """The model's CPU tests must run torch's cross-entropy even while the interpreter is active."""
    from nemotron_core.modeling.model import causal_lm_loss

    monkeypatch.setattr(triton_ce, "cross_entropy_sum", lambda *a, **k: pytest.fail("fused CE on a CPU tensor"))
    logits = _logits(6, 50, torch.bfloat16).reshape(2, 3, 50)
    targets = _targets(6, 50, ignored=(2,)).reshape(2, 3)
    want = F.cross_entropy(logits.float().reshape(-1, 50), targets.reshape(-1), reduction="sum") / 5
    torch.testing.assert_close(causal_lm_loss(logits, targets), want, rtol=0, atol=0)
    torch.testing.assert_close(causal_lm_loss(logits, targets, num_items_in_batch=7), want * 5 / 7,
                               rtol=0, atol=0)
