"""Triton kernels in tests: compiled on CUDA, run by Triton's interpreter on the CPU.

``conftest.py`` switches the interpreter on (``TRITON_INTERPRET=1``) before triton is first imported,
which is the only time it can be. A kernel test module calls ``require_triton()`` at import: it skips
the module when triton is not installed (the CI's test extra installs it) or when the interpreter is
not active (the module was run without the tests' conftest).
"""
from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def require_triton() -> None:
    pytest.importorskip("triton")
    from nemotron_core.ops import triton_moe

    if not triton_moe.usable(torch.empty(0, device=DEVICE)):
        pytest.skip("Triton's interpreter is not active: triton was imported before TRITON_INTERPRET=1 was set "
                    "(tests/conftest.py sets it)", allow_module_level=True)
