"""Tensors derived from a parameter once, for inference.

Some layers want their weights in another form at inference (``A = -exp(A_log)``, the router weight
split into bf16 parts): recomputing it every call costs kernels per layer and token at decode time.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def cached(owner: nn.Module, slot: str, param: torch.Tensor,
           make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``make(param)``, kept on ``owner`` until ``param`` changes (in place, by an optimizer step or a
    load, or by moving to another device or dtype). Only where no gradient is needed: the result
    is computed from the detached parameter."""
    key = (param.data_ptr(), param._version, param.device, param.dtype)
    hit = owner.__dict__.get(slot)  # not a module attribute: stays out of state_dict and .to()
    if hit is None or hit[0] != key:
        hit = (key, make(param.detach()))
        owner.__dict__[slot] = hit
    return hit[1]
