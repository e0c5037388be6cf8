"""The greedy pick and the decode loop's bookkeeping (``nemotron_core.ops.triton_pick``) against their
torch reference, on CPU through Triton's interpreter. Every output is an index or a flag, so the
comparison is exact: the kernel must give the very tokens ``torch.argmax`` gives, ties and NaNs
included."""
from __future__ import annotations

import pytest
import torch

from triton_cpu import DEVICE, require_triton

require_triton()

from nemotron_core.ops import triton_pick  # noqa: E402


def _state(bsz: int, steps: int, g: torch.Generator, done_rows=()) -> dict[str, torch.Tensor]:
    done = torch.zeros(bsz, dtype=torch.bool)
    done[list(done_rows)] = True
    return {"out": torch.full((bsz, steps), -7, dtype=torch.long), "index": torch.tensor([2]),
            "tokens": torch.randint(0, 50, (bsz, 1), generator=g), "done": done,
            "hit_eos": done.clone(), "eos": torch.tensor([5, 11, -1]), "pad": torch.tensor([0])}


def _run(fn, state: dict, **kw) -> dict:
    st = {k: v.clone().to(DEVICE) for k, v in state.items()}
    args = {k: v.clone().to(DEVICE) for k, v in kw.items()}
    fn(**st, **args)
    for name in ("seen", "bad_at"):  # updated in place
        if name in args:
            st[name] = args[name]
    return st


def _logits(bsz: int, vocab: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Rows that exercise the pick: ties across and within blocks, a NaN, all -inf, an EOS winner."""
    x = torch.randn(bsz, vocab, generator=g)
    x[0, [3, vocab - 2]] = 9.0  # tie in different blocks: the first wins
    x[1, [70, 71]] = 9.0  # tie inside one block
    if bsz > 2:
        x[2, vocab - 1] = float("nan")  # a NaN wins (the first), as in torch.argmax
        x[2, 40] = float("nan")
    if bsz > 3:
        x[3] = float("-inf")  # nothing finite: index 0
    if bsz > 4:
        x[4, 11] = 50.0  # an EOS id
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 4096])
def test_greedy_pick_and_bookkeeping_match_reference(dtype: torch.dtype, block: int, monkeypatch) -> None:
    monkeypatch.setattr(triton_pick, "ARGMAX_BLOCK", block)  # 16: several blocks a row, the last partial
    g = torch.Generator().manual_seed(0)
    logits = _logits(6, 100, g, dtype)
    state = _state(6, 5, g, done_rows=[5])
    want = _run(triton_pick.advance_reference, state, logits=logits)
    got = _run(triton_pick.advance, state, logits=logits)
    assert want["out"][:, 2].tolist() == [3, 70, 40, 0, 11, 0]  # the reference is torch.argmax
    for k in want:
        assert torch.equal(want[k].cpu(), got[k].cpu()), k


def test_picked_tokens_eos_and_seen_match_reference() -> None:
    g = torch.Generator().manual_seed(1)
    picked = torch.tensor([5, 11, 7, 3, 9])
    state = _state(5, 4, g, done_rows=[2])
    seen = torch.zeros(5, 20, dtype=torch.bool)
    seen[0, 7] = True
    want = _run(triton_pick.advance_reference, state, picked=picked, seen=seen)
    got = _run(triton_pick.advance, state, picked=picked, seen=seen)
    assert want["out"][:, 2].tolist() == [5, 11, 0, 3, 9]  # the finished row gets padding
    assert want["done"].tolist() == [True, True, True, False, False]  # two EOS ids hit
    assert want["index"].item() == 3
    assert want["seen"].nonzero().tolist() == [[0, 5], [0, 7], [1, 11], [3, 3], [4, 9]]  # not the finished row
    for k in want:
        assert torch.equal(want[k].cpu(), got[k].cpu()), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_pick_stops_rows_whose_logits_broke(dtype: torch.dtype, monkeypatch) -> None:
    """With ``bad_at``: a live row whose largest logit is NaN, +inf or -inf (nothing finite) is done from
    this token on (it gets padding, not the argmax of garbage) and ``bad_at`` records the index, unless a
    row already has one; finite rows and finished rows are left alone."""
    monkeypatch.setattr(triton_pick, "ARGMAX_BLOCK", 16)
    g = torch.Generator().manual_seed(2)
    logits = _logits(7, 100, g, dtype)  # row 2 holds NaNs, row 3 is all -inf
    logits[5, 60] = float("inf")
    logits[6, 7] = float("nan")  # row 6 broke before: its first index stays
    state = _state(7, 5, g, done_rows=[4])
    bad_at = torch.tensor([-1, -1, -1, -1, -1, -1, 1])
    want = _run(triton_pick.advance_reference, state, logits=logits, bad_at=bad_at)
    got = _run(triton_pick.advance, state, logits=logits, bad_at=bad_at)
    assert want["out"][:, 2].tolist() == [3, 70, 0, 0, 0, 0, 0]
    assert want["done"].tolist() == [False, False, True, True, True, True, True]
    assert want["bad_at"].tolist() == [-1, -1, 2, 2, -1, 2, 1]
    for k in want:
        assert torch.equal(want[k].cpu(), got[k].cpu()), k


def test_advance_takes_exactly_one_source() -> None:
    state = {k: v.to(DEVICE) for k, v in _state(2, 3, torch.Generator().manual_seed(0)).items()}
    with pytest.raises(ValueError):
        triton_pick.advance(**state)
