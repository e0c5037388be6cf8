"""``x @ W^T`` for bf16 ``x`` and fp32 ``W`` on bf16 tensor cores, with fp32 accuracy.

The MoE router multiplies bf16 hidden states by an fp32 weight in fp32. Done as written (cast ``x``
to fp32, then an fp32 GEMM) that is a cast kernel plus a GEMM without tensor cores: 0.2 ms per layer
at an 8,192-token prefill, several times the rest of the router. Instead, split ``W`` once into three
bf16 matrices with ``W == hi + mid + lo`` exactly (bf16 keeps 8 significant bits, fp32 24: each part
takes the next 8 of what the previous ones left). Every product of a bf16 ``x`` with a bf16 part is
exact in fp32, so one bf16 GEMM with fp32 accumulation and fp32 output (``aten::mm.dtype``) against
the stacked parts, plus the sum of the three partial results, is ``x @ W^T`` up to the order of the
fp32 additions, the same latitude any fp32 GEMM takes.
"""
from __future__ import annotations

import torch

PARTS = 3


def split(w: torch.Tensor) -> torch.Tensor:
    """``[E, K]`` fp32 -> ``[PARTS * E, K]`` bf16, parts stacked along dim 0: ``w == sum of the parts``."""
    rest = w.float()
    parts = []
    for _ in range(PARTS):
        part = rest.to(torch.bfloat16)
        parts.append(part)
        rest = rest - part.float()  # exact: the difference of two nearby floats
    return torch.cat(parts, dim=0)


def usable(x: torch.Tensor) -> bool:
    """bf16 activations on CUDA (``aten::mm.dtype``, bf16 in and fp32 out, has no CPU kernel)."""
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch.ops.aten.mm, "dtype")


def partial_products(x: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """``x [N, K]`` bf16 times each part: fp32 ``[N, PARTS * E]``; part p of ``x @ W^T`` is columns
    ``p*E : (p+1)*E``, and ``x @ W^T`` is their sum in part order."""
    return torch.ops.aten.mm.dtype(x, parts.t(), torch.float32)


def combine(partial: torch.Tensor) -> torch.Tensor:
    """The sum of the parts (``hi + mid + lo``, in that order) of ``partial_products``' result."""
    n_exp = partial.shape[-1] // PARTS
    out = partial[..., :n_exp]
    for p in range(1, PARTS):
        out = out + partial[..., p * n_exp:(p + 1) * n_exp]
    return out
