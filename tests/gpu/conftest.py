"""GPU tests run under a time limit on a borrowed machine: say how long each took as it finishes, so a
run cut off by the limit still shows where the time went (``--durations`` prints only at the end)."""
from __future__ import annotations

import sys


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or report.outcome == "failed":
        print(f"[{report.when} {report.outcome} {report.duration:.1f}s] {report.nodeid}", file=sys.__stderr__, flush=True)
