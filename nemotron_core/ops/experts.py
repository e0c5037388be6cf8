"""Routed experts of the MoE block: non-gated relu2 MLPs stored as stacked weights.

``up`` is ``[E, inter, in]`` and ``down`` ``[E, out, inter]`` (the checkpoint's per-expert
``[out, in]`` Linear weights, stacked). Two implementations of one function:

* ``grouped_experts`` (default): tokens sorted by expert, one grouped GEMM per projection, no Python
  loop over experts and no host synchronisation;
* ``loop_experts``: one matmul per expert that received tokens; the readable reference.

Both return ``sum_k w[t, k] * expert_{idx[t, k]}(x[t])`` accumulated in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def loop_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32, device=x.device)
    for e in idx.unique().tolist():
        token, slot = torch.where(idx == e)
        h = relu2(F.linear(x[token], up[e]))
        y = F.linear(h, down[e])
        out.index_add_(0, token, y.float() * weights[token, slot, None].float())
    return out.to(x.dtype)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


def grouped_mm_supported(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> bool:
    """torch's grouped GEMM needs 16-byte aligned rows, and bf16 on CUDA."""
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if x.is_cuda and x.dtype != torch.bfloat16:
        return False
    align = 16 // x.element_size()
    return all(d % align == 0 for d in (up.shape[1], up.shape[2], down.shape[1]))


def grouped_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    if not grouped_mm_supported(x, up, down):
        return loop_experts(x, idx, weights, up, down)
    ntok, topk = idx.shape
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    # scatter_add rather than bincount: bincount syncs with the host on CUDA (it sizes its output).
    counts = torch.zeros(up.shape[0], dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    xs = x.index_select(0, order // topk)
    h = relu2(_grouped_mm(xs, up.transpose(1, 2), offs))
    y = _grouped_mm(h, down.transpose(1, 2), offs)
    # Back to (token, k) order with a gather (cheaper than an indexed write), so the k-sum below is
    # deterministic.
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    slots = y.index_select(0, inverse)
    out = (slots.view(ntok, topk, -1).float() * weights[..., None].float()).sum(1)
    return out.to(x.dtype)
