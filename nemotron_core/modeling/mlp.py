"""The dense MLP block (``-``): ``down(relu(up(x)) ** 2)``, no gate projection."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.experts import relu2


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, meta=None, cache=None) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))
