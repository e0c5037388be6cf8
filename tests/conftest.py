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
