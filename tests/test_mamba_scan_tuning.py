"""mamba-ssm's scan autotunes once per kernel key, at whatever length comes first: the mixer makes
that first length a long one (``SCAN_TUNE_TOKENS``). Checked with a recording stand-in for the scan."""
from __future__ import annotations

import torch

from nemotron_core.modeling import mamba2


def test_first_short_scan_of_a_kind_tunes_at_a_long_length(monkeypatch) -> None:
    monkeypatch.setattr(mamba2, "_scan_tuned", set())
    calls = []

    def scan(x, dt, A, B, C, chunk_size, **kwargs):
        calls.append((tuple(x.shape), tuple(dt.shape), tuple(B.shape), tuple(C.shape), kwargs.get("seq_idx") is not None,
                      kwargs.get("initial_states"), bool(x.abs().sum() == 0)))

    x, dt = torch.randn(2, 128, 4, 8), torch.rand(2, 128, 4)
    B = C = torch.randn(2, 128, 1, 16)
    A = -torch.rand(4)
    seq_idx = torch.zeros(2, 128, dtype=torch.int32)
    kwargs = dict(D=torch.ones(4), seq_idx=seq_idx, initial_states=torch.zeros(2, 4, 8, 16), return_final_states=True)
    mamba2._tune_scan_at_length(scan, x, dt, A, B, C, 64, **kwargs)
    n = mamba2.SCAN_TUNE_TOKENS
    assert calls == [((1, n, 4, 8), (1, n, 4), (1, n, 1, 16), (1, n, 1, 16), True, None, True)]
    assert kwargs["seq_idx"] is seq_idx  # the caller's arguments are untouched
    mamba2._tune_scan_at_length(scan, x, dt, A, B, C, 64, **kwargs)  # same kind again: nothing
    assert len(calls) == 1
    long = torch.randn(1, n, 4, 8)  # a first call that is long already tunes itself
    mamba2._tune_scan_at_length(scan, long, dt, A, B, C, 32, **kwargs)
    assert len(calls) == 1
