"""Shared test set-up: offline Hugging Face, and the tests folder on sys.path.

The tests folder is put on ``sys.path`` so plain helper modules import by name
(``import cli_helpers``, ``import tiny``).
"""
from __future__ import annotations

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

# The models under test are tiny: with torch's default of one thread per core, thread start-up and
# contention on a 2-core CI machine cost far more than the arithmetic (seen as 100x slower runs).
# Subprocesses (the CLI tests) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config) -> None:
    import torch

    torch.set_num_threads(1)
