"""Start-up time of ``nemotron --help`` (median of N runs), with ``import torch`` for reference.

    python benchmarks/cli_startup.py [--runs 10]

Prints a markdown table. The installed console script in this interpreter's scripts folder is
used (not a pyenv shim, whose own start-up would be measured too).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time


def time_runs(cmd: list[str], runs: int) -> list[float]:
    env = {**os.environ, "NO_COLOR": "1"}
    subprocess.run(cmd, capture_output=True, env=env, check=True)  # warm the file cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=env, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    exe = shutil.which("nemotron", path=sysconfig.get_path("scripts"))
    if exe is None:
        sys.exit("error: nemotron is not installed for this interpreter; run `pip install -e .`")
    cases = {
        "`nemotron --help`": [exe, "--help"],
        "`nemotron --version`": [exe, "--version"],
        '`python -c "import torch"` (reference)': [sys.executable, "-c", "import torch"],
    }
    print(f"{platform.python_implementation()} {platform.python_version()}, "
          f"{platform.machine()}, {args.runs} runs each\n")
    print("| command | median (ms) | min (ms) | max (ms) |")
    print("|---|---:|---:|---:|")
    for label, cmd in cases.items():
        t = [x * 1000 for x in time_runs(cmd, args.runs)]
        print(f"| {label} | {statistics.median(t):.0f} | {min(t):.0f} | {max(t):.0f} |", flush=True)


if __name__ == "__main__":
    main()
