"""``Linear``: ``nn.Linear`` (same parameters, same checkpoint names) with a switchable decode path.

With ``BackendConfig(linear="triton")`` a single-row projection (a batch-1 decode step) without autograd
runs as one Triton GEMV (``ops.triton_experts.dense_gemv``) instead of cuBLAS's split-K GEMM and its
reduction kernel; everything else is ``F.linear``. ``relu2_forward`` also folds the MLP activation
into that GEMV. The model hands every ``Linear`` its (shared) backend object after construction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import triton_experts
from ..ops.experts import relu2


class Linear(nn.Linear):
    backend = None  # BackendConfig, set by NemotronV3Model

    def _gemv(self, x: torch.Tensor) -> bool:
        backend = self.backend
        return (backend is not None and backend.linear == "triton" and self.bias is None
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
                and triton_experts.dense_supported(x, self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gemv(x):
            return triton_experts.dense_gemv(x, self.weight)
        return F.linear(x, self.weight, self.bias)

    def relu2_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu2(self(x))``, as one kernel on the GEMV path."""
        if self._gemv(x):
            return triton_experts.dense_gemv(x, self.weight, relu2=True)
        return relu2(F.linear(x, self.weight, self.bias))
