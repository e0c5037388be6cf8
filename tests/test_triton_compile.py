"""Every Triton kernel of ours compiles for sm_90 (H100/H200) on this GPU-less machine.

The CPU interpreter runs a kernel's Python, not Triton's compiler, so code it accepts can still fail
to compile on a GPU. ``triton_sm90_compile.py`` compiles each kernel variant with the ptxas that
ships with triton; it runs in a subprocess because this process has the interpreter switched on.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_all_kernels_compile_for_sm90() -> None:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_sm90_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # This checkout's code, whatever the installed package points at.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    report = run.stdout[-8000:] + run.stderr[-4000:]
    assert run.returncode == 0, report
    assert "kernel variants compiled for sm_90" in run.stdout, report
