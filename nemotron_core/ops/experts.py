"""Routed experts of the MoE block: non-gated relu2 MLPs stored as stacked weights.

``up`` is ``[E, inter, in]`` and ``down`` ``[E, out, inter]`` (the checkpoint's per-expert
``[out, in]`` Linear weights, stacked). Two implementations of one function:

* ``grouped_experts`` (default): tokens sorted by expert, one grouped GEMM per projection, no Python
  loop over experts and no host synchronisation;
* ``loop_experts``: one matmul per expert that received tokens; the readable reference.

Both return ``sum_k w[t, k] * expert_{idx[t, k]}(x[t]) (+ shared[t])``: the routed sum accumulated
in fp32, the optional ``shared`` (the shared expert's output, ``[N, out]``) added in fp32, one rounding
to ``x.dtype``. On CUDA (or under Triton's interpreter) and without autograd, ``grouped_experts``
does that last step with ``triton_moe.combine_triton``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import triton_act, triton_moe


def relu2_reference(x: torch.Tensor) -> torch.Tensor:
    """The reference ``relu(x) ** 2`` (the activation of every MLP and expert), in plain torch."""
    return F.relu(x).square()


def relu2(x: torch.Tensor) -> torch.Tensor:
    """``relu(x) ** 2``: one Triton pass (``triton_act``) on CUDA tensors, else the reference.

    Bit-equal either way. CPU tensors always take the reference (even under Triton's interpreter),
    and so does code being compiled by torch.compile, where inductor fuses the two torch ops itself
    (and into neighbours), better than an opaque kernel call.
    """
    if x.is_cuda and not torch.compiler.is_compiling() and triton_act.supported(x):
        return triton_act.relu2_triton(x)
    return relu2_reference(x)


def loop_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 shared: Optional[torch.Tensor] = None) -> torch.Tensor:
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32, device=x.device)
    for e in idx.unique().tolist():
        token, slot = torch.where(idx == e)
        h = relu2(F.linear(x[token], up[e]))
        y = F.linear(h, down[e])
        out.index_add_(0, token, y.float() * weights[token, slot, None].float())
    return _finish(out, shared, x.dtype)


def _finish(routed: torch.Tensor, shared: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The fp32 routed sum (+ the shared expert's output, in fp32), rounded once to ``dtype``."""
    if shared is not None:
        routed = routed + shared.float()
    return routed.to(dtype)


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


def grouped_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                    shared: Optional[torch.Tensor] = None) -> torch.Tensor:
    if not grouped_mm_supported(x, up, down):
        return loop_experts(x, idx, weights, up, down, shared)
    ntok, topk = idx.shape
    order, counts = sort_by_expert(idx, up.shape[0])
    offs = counts.cumsum(0).to(torch.int32)
    xs = x.index_select(0, order // topk)
    h = relu2(_grouped_mm(xs, up.transpose(1, 2), offs))
    y = _grouped_mm(h, down.transpose(1, 2), offs)
    # inverse[t * k + j]: the row of y (sorted by expert) holding token t's j-th expert output.
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    if _fused_combine(y, weights, shared):
        # One kernel reads y in place through ``inverse`` and writes the output once, instead of a
        # gathered copy of y, fp32 [tokens * k, hidden] products, a sum and a cast.
        return triton_moe.combine_triton(y, inverse.view(ntok, topk), weights, shared, out_dtype=x.dtype)
    # Back to (token, k) order with a gather (cheaper than an indexed write), so the k-sum below is
    # deterministic.
    slots = y.index_select(0, inverse)
    out = (slots.view(ntok, topk, -1).float() * weights[..., None].float()).sum(1)
    return _finish(out, shared, x.dtype)


def sort_by_expert(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the (token, expert) slots ``t * k + j`` in order of expert id, stable; slots per expert), on the
    device without a host sync."""
    flat = idx.reshape(-1)
    order = _sort_key(flat, n_experts).argsort(stable=True)
    # scatter_add rather than bincount: bincount syncs with the host on CUDA (it sizes its output).
    counts = torch.zeros(n_experts, dtype=torch.int64, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, counts


def _sort_key(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Expert ids in the narrowest integer type that holds them: a radix sort makes one pass per key
    byte, so int64 ids cost eight passes where one (uint8, up to 256 experts) gives the same stable
    order."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if n_experts <= torch.iinfo(dtype).max + 1:
            return ids.to(dtype)
    return ids


def _fused_combine(y: torch.Tensor, weights: torch.Tensor, shared: Optional[torch.Tensor]) -> bool:
    """Whether the Triton combine replaces the torch one: on CUDA, and not when autograd needs the
    graph (it has no backward)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (y, weights, shared)):
        return False
    return y.is_cuda and triton_moe.usable(y)
