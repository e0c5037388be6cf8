"""The one place that knows which tensors stay fp32 whatever the model dtype.

Mamba's A_log, D, dt_bias feed exp/softplus of a long recurrence, and the router's weight and
correction bias decide expert choice by small score differences: bf16 would change results.
"""
from __future__ import annotations

import torch
from torch import nn

FP32_SUFFIXES = (".A_log", ".D", ".dt_bias", ".gate.weight", ".gate.e_score_correction_bias")

DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def keeps_fp32(name: str) -> bool:
    return ("." + name).endswith(FP32_SUFFIXES)


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).replace("torch.", "")
    if key not in DTYPE_NAMES:
        from .errors import InputError

        raise InputError(f"unknown dtype {value!r}; use bf16, fp16 or fp32")
    return DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def target_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if keeps_fp32(name) else dtype


@torch.no_grad()
def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and buffers to ``dtype``, keeping the fp32-only ones in fp32."""
    for name, p in model.named_parameters():
        want = target_dtype(name, dtype)
        if p.is_floating_point() and p.dtype != want:
            p.data = p.data.to(want)
    for name, b in model.named_buffers():
        want = target_dtype(name, dtype)
        if b.is_floating_point() and b.dtype != want:
            b.data = b.data.to(want)
    return model
