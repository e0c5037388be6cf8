"""Shared test set-up: offline Hugging Face, and the tests folder on sys.path.

The tests folder is put on ``sys.path`` so plain helper modules import by name
(``import cli_helpers``, ``import tiny``).
"""
from __future__ import annotations

import os
import sys

import pytest

# Triton kernels are checked on the CPU through Triton's interpreter. It has to be switched on before
# triton is first imported (triton.jit reads the variable when it decorates, triton.language's own
# helpers included), and importing the models imports triton (through transformers/torch._dynamo):
# so here, before anything else. The models themselves take Triton paths only for CUDA tensors.
if "triton" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture
def fast_lm_eval(monkeypatch):
    """Skip what costs seconds and is not under test: torch's collect_env report in every
    simple_evaluate (~3 s here), and indexing lm-eval's built-in tasks (~11 s) when a name is unknown."""
    pytest.importorskip("lm_eval")
    import lm_eval.evaluator
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda storage: None)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        lambda include_path=None, include_defaults=True, **kw: real(include_path=include_path,
                                                                                    include_defaults=False, **kw))
