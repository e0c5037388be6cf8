"""``Linear``: ``nn.Linear`` (same parameters, same checkpoint names) with a switchable decode path.

With ``BackendConfig(linear="triton")`` a single-row projection (a batch-1 decode step) without autograd
runs as one Triton GEMV (``ops.triton_gemv``, split K with an in-kernel reduction) instead of
cuBLAS's split-K GEMM and its reduction kernel; with ``"auto"`` (the default) only on CUDA and only
the shapes where that measured faster (``gemv_pays``); everything else is ``F.linear``. ``relu2_forward``
also folds the MLP activation into that GEMV, and ``add_forward`` adds a block's residual inside the
GEMM. The model hands every ``Linear`` its (shared) backend object after construction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import triton_gemv
from ..ops.experts import relu2


def gemv_pays(out_features: int, in_features: int) -> bool:
    """Whether the decode GEMV beat cuBLAS at one row for this shape on the H200 (bf16,
    ``benchmarks/gpu_gemv_sweep.py``): it did for many outputs (Mamba in_proj 10304 x 2688: 16.2
    against 17.0 us; LM head 131072 x 2688: 159 against 171 us) and for long inputs (out_proj and
    o_proj 2688 x 4096 with the residual: 9.7 against 10.6 us), not for the fused q/k/v
    (4608 x 2688: 10.9 against 9.1 us)."""
    return out_features >= 8192 or in_features >= 4096


def takes_gemv(backend, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``x @ weight.T`` runs as the Triton decode GEMV: ``backend.linear`` "triton", or "auto" on
    CUDA where ``gemv_pays``; one row, no bias, no autograd, no autocast."""
    choice = getattr(backend, "linear", "torch")
    if choice == "auto":
        if not (x.is_cuda and gemv_pays(*weight.shape)):
            return False
    elif choice != "triton":
        return False
    return (bias is None and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
            and triton_gemv.supported(x, weight))


def project(backend, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` through the decode GEMV where ``backend`` asks for it (``takes_gemv``)."""
    return triton_gemv.gemv(x, weight) if takes_gemv(backend, x, weight) else F.linear(x, weight)


class Linear(nn.Linear):
    backend = None  # BackendConfig, set by NemotronV3Model

    def _gemv(self, x: torch.Tensor) -> bool:
        return takes_gemv(self.backend, x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gemv(x):
            return triton_gemv.gemv(x, self.weight)
        return F.linear(x, self.weight, self.bias)

    def relu2_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu2(self(x))``, as one kernel on the GEMV path."""
        if self._gemv(x):
            return triton_gemv.gemv(x, self.weight, relu2=True)
        return relu2(F.linear(x, self.weight, self.bias))

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``residual + self(x)``; with ``inplace`` (the caller owns ``residual`` and no autograd
        records this), possibly written into ``residual`` itself.

        On CUDA with everything in one dtype this is cuBLAS's ``addmm``: torch copies the residual
        into the output, and the GEMM's epilogue adds its product to it (rounding once instead of
        twice). Against a separate add kernel that reads two hidden-state tensors and writes one, the
        copy reads one and writes one: at an 8,192-token prefill the 52 adds took 1.5 ms of GPU time,
        the copies 0.5 ms; ``inplace`` accumulates into the residual and skips the copy too. The
        Triton GEMV adds it in its epilogue (no copy). Under autocast (which
        would cast an fp32 residual stream to bf16) and on the CPU the residual is added after the
        projection.
        """
        if self._gemv(x):
            if residual.dtype == x.dtype and residual.shape[:-1] == x.shape[:-1]:
                return triton_gemv.gemv(x, self.weight, residual=residual)
            return residual + triton_gemv.gemv(x, self.weight)
        if (self.bias is None and x.is_cuda and not torch.compiler.is_compiling()
                and x.dtype == residual.dtype == self.weight.dtype and not torch.is_autocast_enabled("cuda")):
            x2 = x.reshape(-1, x.shape[-1])
            if inplace and residual.is_contiguous() and not torch.is_grad_enabled():
                return residual.view(-1, residual.shape[-1]).addmm_(x2, self.weight.t()).view(residual.shape)
            out = torch.addmm(residual.reshape(-1, residual.shape[-1]), x2, self.weight.t())
            return out.view(residual.shape)
        return residual + F.linear(x, self.weight, self.bias)


def add_linear(residual: torch.Tensor | None, proj: nn.Module, x: torch.Tensor, meta=None) -> torch.Tensor:
    """``residual + proj(x)`` (``proj(x)`` when ``residual`` is None); a ``Linear`` adds in its GEMM
    where it can (``Linear.add_forward``; into ``residual`` itself when ``meta.residual_writable``),
    an adapter wrapper (LoRA) after its projection."""
    if residual is None:
        return proj(x)
    if isinstance(proj, Linear):
        return proj.add_forward(x, residual, inplace=getattr(meta, "residual_writable", False))
    return residual + proj(x)
