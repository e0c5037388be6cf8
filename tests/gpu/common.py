"""Helpers shared by the GPU tests."""
from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` (b is the reference)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
