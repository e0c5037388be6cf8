"""Decode-sized MoE expert inputs on which every product and sum of the one-kernel expert path
(``nemotron_core.ops.triton_expert_mlp``) is exact, and their exact output: shared by the CPU and GPU
tests (plain helpers: ``import exact_experts``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def inputs(n_tok: int, top_k: int, d: int, inter: int, seed: int, device: str = "cpu", n_exp: int = 8):
    """Decode-sized expert inputs on which the one-kernel path's every product and sum is exact: three
    non-zero entries in {+-1/2, +-1} per row of x, weights in {0, +-1/2, +-1}, so the intermediate
    (a square of a multiple of 1/4 up to 3) is exact in bf16; router weights are powers of two. Then
    its output is the exact sum rounded once, whatever the order of its additions."""
    g = torch.Generator().manual_seed(seed)

    def grid(*shape):
        return (torch.randint(-2, 3, shape, generator=g) / 2).bfloat16()

    x = torch.zeros(n_tok, d)
    for t in range(n_tok):
        cols = torch.randperm(d, generator=g)[:3]
        x[t, cols] = (torch.randint(1, 3, (3,), generator=g) / 2) * (torch.randint(0, 2, (3,), generator=g) * 2 - 1)
    up, down = grid(n_exp, inter, d), grid(n_exp, d, inter)
    s_up, s_down = grid(2 * inter, d), grid(d, 2 * inter)
    idx = torch.rand(n_tok, n_exp, generator=g).argsort(-1)[:, :top_k]
    w = 2.0 ** -torch.randint(0, 4, (n_tok, top_k), generator=g).float()
    residual = (torch.randint(-16, 17, (n_tok, d), generator=g) / 8).bfloat16()
    return [t.to(device) for t in (x.bfloat16(), idx, w, up, down, s_up, s_down, residual)]


def exact_sum(x, idx, w, up, down, s_up, s_down, residual) -> torch.Tensor:
    """The experts' output in fp64, unrounded: the routed and shared experts on the bf16 intermediate,
    plus the residual."""
    def mlp(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = F.relu(t.double() @ a.double().t()).square().float().bfloat16()
        return h.double() @ b.double().t()

    want = residual.double() + mlp(x, s_up, s_down)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            want[t] += w[t, j].double() * mlp(x[t:t + 1], up[idx[t, j]], down[idx[t, j]])[0]
    return want
