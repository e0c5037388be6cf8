"""The dense MLP block (``-``): ``down(relu(up(x)) ** 2)``, no gate projection."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.experts import relu2
from .linear import Linear, add_linear


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, meta=None, cache=None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output; with ``residual``, ``residual + output``."""
        up = self.up_proj
        # An adapter wrapper (LoRA) is not a Linear: it takes the plain path.
        h = up.relu2_forward(x) if isinstance(up, Linear) else relu2(up(x))
        return add_linear(residual, self.down_proj, h, meta)
