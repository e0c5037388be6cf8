"""How accurate, and how fast, can the MoE router's fp32 GEMM be on tensor cores? (one GPU, ~20 s)

The router multiplies bf16 hidden states by an fp32 weight in fp32 (as transformers does). cuBLAS's
IEEE fp32 GEMM plus the input cast cost 4.5 ms of an 8,192-token prefill of the Nano shape. Splitting
the weight into three bf16 parts (``W == hi + mid + lo`` exactly) makes every product exact on bf16
tensor cores, but tensor cores do not add products in IEEE fp32: a first version (withdrawn) failed
its accuracy test at 512 tokens. This measures, against an fp64 reference, per token count:

* ``fp32``: cuBLAS, ``F.linear(x.float(), W)``: the reference the model uses;
* ``bf16x3``: one bf16 GEMM with fp32 output over the stacked parts, summed in fp32;
* ``bf16x3_chunkC``: the same with K cut into chunks of C, each chunk's product from the tensor
  cores summed across chunks in IEEE fp32 (the error of in-MMA accumulation then spans C products);
* ``triton_router``: ``nemotron_core.ops.triton_router``, the chunk-64 scheme as one kernel (what
  the model runs);

the error (max |d| / max |exact|), the tokens whose top-6 expert choice (sigmoid + correction bias)
differs from the one the fp64 logits give, and the time per call at 1 and 8,192 tokens. A variant is fit to
replace ``fp32`` when its error and choice flips are no worse than ``fp32``'s.

    python benchmarks/gpu_router_precision.py [--out router.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from nemotron_core.ops import triton_router

HIDDEN, N_EXP, TOP_K = 2688, 128, 6


def split3(w: torch.Tensor) -> torch.Tensor:
    """``[E, K]`` fp32 -> ``[3E, K]`` bf16 whose three ``[E, K]`` blocks sum exactly to ``w``."""
    parts, rest = [], w.float()
    for _ in range(3):
        part = rest.to(torch.bfloat16)
        parts.append(part)
        rest = rest - part.float()
    assert torch.count_nonzero(rest) == 0
    return torch.cat(parts)


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.mm.dtype(a, b, torch.float32)


def bf16x3(x: torch.Tensor, parts: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    e = parts.shape[0] // 3
    k = x.shape[1]
    bounds = [(0, k)] if chunk is None else [(s, min(s + chunk, k)) for s in range(0, k, chunk)]
    total = None
    for lo, hi in bounds:
        part = mm_fp32_out(x[:, lo:hi], parts[:, lo:hi].t())
        part = (part[:, :e] + part[:, e:2 * e]) + part[:, 2 * e:]
        total = part if total is None else total + part
    return total


def choices(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return (logits.float().sigmoid() + bias).topk(TOP_K, dim=-1).indices.sort(-1).values


def time_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(N_EXP, HIDDEN, device="cuda", generator=g) * 0.02  # logits of std ~1
    bias = torch.randn(N_EXP, device="cuda", generator=g) * 0.05
    parts = split3(w)
    variants = {
        "fp32": lambda x: F.linear(x.float(), w),
        "bf16x3": lambda x: bf16x3(x, parts),
        **{f"bf16x3_chunk{c}": (lambda x, c=c: bf16x3(x, parts, c)) for c in (16, 64, 256)},
        # What the model's router runs: the chunk-64 scheme in one Triton kernel (the split in-kernel).
        "triton_router": lambda x: triton_router.router_logits(x, w),
    }
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "by_tokens": {}}
    for n in (1, 8, 512, 8192):
        x = torch.randn(n, HIDDEN, device="cuda", generator=g).bfloat16()
        exact = F.linear(x.double(), w.double())
        want = choices(exact, bias.double())
        row = {}
        for name, fn in variants.items():
            got = fn(x)
            row[name] = {"rel_err": ((got.double() - exact).abs().max() / exact.abs().max()).item(),
                         "choice_flips": int((choices(got, bias) != want).any(-1).sum())}
            if n in (1, 8192):
                row[name]["ms"] = time_ms(lambda fn=fn, x=x: fn(x))
        results["by_tokens"][n] = row
        for name, r in row.items():
            print(f"tokens {n:5d}  {name:18s} " + "  ".join(f"{k} {v:.3g}" for k, v in r.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
