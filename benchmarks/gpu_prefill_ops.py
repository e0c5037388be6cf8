"""Where a short prompt's GPU time goes outside the expert kernels: the launching call sites.

The 128-token prompt of the batch-1 generate benchmark spends about 12.5 ms in the expert kernels and
5 ms in everything else, against well under 1 ms of non-expert weights at the HBM's rate: small
kernels (copies, fills, sorts, norms) dominate that part. This profiles one eager prefill of the
Nano-30B-A3B shape (random bf16 weights) with call stacks and lists, per op of interest, the source
lines of ours that launch it with their counts, and the top kernels by GPU time.

    python benchmarks/gpu_prefill_ops.py [--batch 1] [--length 128] [--out ops.json]
"""
from __future__ import annotations

import argparse
import json
import traceback
from collections import defaultdict

import torch

# The launches of interest (aten op name prefixes): data movement and bookkeeping, not the GEMMs.
OPS = ("copy_", "_to_copy", "fill_", "zero_", "sort", "index", "cat", "clone", "masked_fill", "cumsum",
       "bincount", "nonzero", "arange", "zeros", "ones", "full", "new_zeros", "where", "scatter", "gather")


class SiteCounter:
    """A dispatch mode that counts the aten ops in ``OPS`` by the source lines of ours that called them
    (the innermost ``depth`` frames under nemotron_core/); the profiler's own stacks miss ops called
    from inside other ops (copy_ inside to)."""

    def __init__(self, depth: int = 3) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counts: dict[tuple[str, str], int] = defaultdict(int)
        self.counts = counts

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0]
                if name.startswith(OPS):
                    frames = [f for f in traceback.extract_stack()[:-1] if "nemotron_core" in f.filename]
                    where = " <- ".join(f"{f.filename.split('nemotron_core/')[-1]}:{f.lineno}"
                                        for f in reversed(frames[-depth:])) or "(outside nemotron_core)"
                    counts[(name, where)] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="nemotron-3-nano-30b-a3b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from nemotron_core.create import build_config, random_model
    from nemotron_core.generation import Decoder

    config = build_config(args.preset)
    model = random_model(config, torch.bfloat16, seed=0, device="cuda").eval()
    dec = Decoder(model, args.batch, args.length + 8, cuda_graph=False)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    ids = ids.cuda()
    for _ in range(3):
        dec.prefill(ids, torch.ones_like(ids))
    torch.cuda.synchronize()
    counter = SiteCounter()
    with counter.mode:
        dec.prefill(ids, torch.ones_like(ids))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.prefill(ids, torch.ones_like(ids))
        torch.cuda.synchronize()
    rows = sorted(((op, where, n) for (op, where), n in counter.counts.items()), key=lambda r: -r[2])
    for op, where, n in rows[:50]:
        print(f"{n:5d}x {op:18s} {where}", flush=True)
    kernels = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    gpu_us = sum(e.self_device_time_total for e in kernels)
    print(f"GPU time {gpu_us / 1e3:.2f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "batch": args.batch, "length": args.length, "gpu_ms": gpu_us / 1e3,
                       "sites": [{"op": op, "where": where, "calls": n} for op, where, n in rows],
                       "kernels": [f"{e.key[:70]} calls={e.count} us={e.self_device_time_total:.0f}"
                                   for e in kernels[:40]]}, f, indent=1)


if __name__ == "__main__":
    main()
