"""Time the expert GEMV (and the dense GEMV on the Mamba in_proj) over a grid of tile configs.

The autotuner only chooses among the configs listed in ``ops/triton_experts.py``; this sweep is how
that list is chosen. Shapes are the Nano-30B-A3B decode step's: the routed experts' up projection
(6 experts of 1856 x 2688 per token plus the shared expert as two more) and down projection, at
batch 1 and 8, and the Mamba in_proj (10304 x 2688) at one row. Each timed call uses one of 20
different routings over all 128 experts, so the weights come from HBM as in the model (one routing
replayed would sit partly in the 50 MB L2). Times are per call, from 100 calls in one CUDA graph.

    python benchmarks/gpu_gemv_sweep.py [--out sweep.json]
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from gpu_gemv import graph_time_us
from nemotron_core.ops import triton_experts

E, INTER, HIDDEN, SHARED, TOPK, ROUTINGS = 128, 1856, 2688, 3712, 6, 20
TILES = [(bn, bk) for bn in (16, 32, 64) for bk in (128, 256)] + [(16, 512)]
CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=bk, GROUPED=True, num_warps=w, num_stages=st)
           for (bn, bk), w, st in itertools.product(TILES, (4, 8), (2, 3, 4))]


def _time(call, configs) -> list[dict]:
    """``call(config)`` timed for every config and for the autotuner's own pick (config None)."""
    rows = []
    for cfg in [None] + configs:
        try:
            us = graph_time_us(lambda: call(cfg), reps=5) / ROUTINGS
        except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
            rows.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        rows.append({"config": cfg or "autotuned", "us": round(us, 2)})
    return rows


def _prompt_routing(tokens: int, skew: float, g: torch.Generator) -> torch.Tensor:
    """Top-``TOPK`` expert ids per token, drawn (Gumbel top-k) from per-expert popularities
    ``exp(N(0, skew))``: 0 is uniform routing; 0.75 is as uneven as the second MoE layer of a random
    Nano model on a 1,024-token prompt (busiest expert about 200 slots against 48 on average)."""
    pop = torch.randn(E, device="cuda", generator=g) * skew
    gumbel = -torch.log(-torch.log(torch.rand(tokens, E, device="cuda", generator=g)))
    return (pop + gumbel).topk(TOPK, dim=-1).indices


def prompt_experts(results: dict, randn, up, down) -> None:
    """A prompt's routed experts (128 and 1024 tokens over all 128 experts, uniform and skewed routing):
    torch's grouped GEMM path against the expert-sorted Triton kernels, whole ``*_experts`` calls."""
    from nemotron_core.ops import triton_sorted_experts
    from nemotron_core.ops.experts import grouped_experts

    g = torch.Generator(device="cuda").manual_seed(2)
    nbytes = 2 * E * INTER * HIDDEN * 2  # every expert's two matrices, once
    for tokens, skew in itertools.product((128, 1024), (0.0, 0.75)):
        x = randn(tokens, HIDDEN)
        idx = _prompt_routing(tokens, skew, g)
        w = torch.rand(tokens, TOPK, device="cuda", generator=g)

        with torch.no_grad():
            row = {"grouped_mm_us": graph_time_us(lambda: grouped_experts(x, idx, w, up, down), reps=3),
                   "sorted_triton_us": graph_time_us(lambda: triton_sorted_experts.sorted_experts(x, idx, w, up, down),
                                                     reps=3)}
        row.update({key.replace("_us", "_TBs"): round(nbytes / v / 1e6, 2) for key, v in list(row.items())})
        row["busiest_expert_slots"] = int(torch.bincount(idx.reshape(-1), minlength=E).max())
        results[f"prompt experts {tokens} tokens skew {skew}"] = row
        print(f"prompt experts, {tokens} tokens, skew {skew}:", row, flush=True)


def small_kernels(results: dict, randn) -> None:
    """The MoE block's small decode kernels with and without the folded RMSNorms: the router's partial
    logits (norm of the block's input) and the combine (norm of the block's output, for the next
    block), each against the separate norm kernel they replace; the combine at several warp counts."""
    from nemotron_core.ops import triton_moe, triton_router
    from nemotron_core.ops.norms import rms_norm

    router = torch.randn(E, HIDDEN, device="cuda") * 0.02
    gain = randn(HIDDEN) + 1
    parts = SHARED // INTER
    for batch in (1, 8):
        xs = [randn(batch, HIDDEN) for _ in range(ROUTINGS)]
        ys = [randn(batch * (TOPK + parts), HIDDEN) for _ in range(ROUTINGS)]
        w = torch.rand(batch, TOPK, device="cuda")
        row = {
            "rms_norm": lambda: [rms_norm(x, gain, 1e-5) for x in xs],
            "router_partials": lambda: [triton_router.router_partials(x, router) for x in xs],
            "router_partials+norm": lambda: [triton_router.router_partials(x, router, norm=(gain, 1e-5)) for x in xs],
            "combine": lambda: [triton_moe.combine_triton(y, None, w, x, shared_parts=parts) for x, y in zip(xs, ys)],
        }
        for warps in (4, 8, 16):
            def folded(warps=warps):
                triton_moe.NORM_WARPS = warps
                return [triton_moe.combine_triton(y, None, w, x, shared_parts=parts, next_norm=(gain, 1e-5))
                        for x, y in zip(xs, ys)]
            row[f"combine+norm/{warps}w"] = folded
        times = {}
        for name, fn in row.items():
            times[name] = round(graph_time_us(fn, reps=5) / ROUTINGS, 2)
        triton_moe.NORM_WARPS = 4
        results[f"small kernels b{batch}"] = times
        print(f"small kernels b{batch} (us per call):", times, flush=True)


SORTED_CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
                  for bn, bk, w, st in ((32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3),
                                        (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 4, 2), (256, 64, 8, 3),
                                        (256, 64, 8, 2), (256, 128, 8, 2), (64, 128, 4, 4), (128, 64, 8, 4))]


def prompt_configs(results: dict, randn, up, down) -> None:
    """The expert-sorted prompt kernel's projections (up with relu2, down) over tile configs, at 128
    and 1024 tokens with random routing: which configs its autotuner should choose from."""
    from nemotron_core.ops import triton_sorted_experts
    from nemotron_core.ops.experts import sort_by_expert

    g = torch.Generator(device="cuda").manual_seed(3)
    nbytes = E * INTER * HIDDEN * 2  # every expert's matrix of one projection, once
    for tokens in (128, 1024):
        x = randn(tokens, HIDDEN)
        idx = torch.rand(tokens, E, device="cuda", generator=g).argsort(-1)[:, :TOPK]
        order, counts = sort_by_expert(idx, E)
        h = randn(tokens * TOPK, INTER)
        calls = {"up": lambda cfg: triton_sorted_experts._project(x, up, order, counts, TOPK, True, config=cfg),
                 "down": lambda cfg: triton_sorted_experts._project(h, down, order, counts, None, False, config=cfg)}
        for name, call in calls.items():
            rows = []
            for cfg in [None] + SORTED_CONFIGS:
                try:
                    with torch.no_grad():
                        us = graph_time_us(lambda: call(cfg), reps=3)
                except Exception as e:  # noqa: BLE001 - reported, not fatal
                    rows.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                rows.append({"config": cfg or "autotuned", "us": round(us, 1), "tb_s": round(nbytes / us / 1e6, 2)})
            results[f"sorted {name} {tokens} tokens"] = rows
            ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
            print(f"sorted {name}, {tokens} tokens: autotuned {rows[0].get('us')} us; best:", flush=True)
            for r in ok[:4]:
                print("   ", r, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--parts", default="experts,dense,prompt,small",
                    help="comma-separated: experts, dense, prompt, prompt_configs, small")
    args = ap.parse_args()
    parts_wanted = set(args.parts.split(","))
    g = torch.Generator(device="cuda").manual_seed(0)
    randn = lambda *s: (torch.randn(*s, device="cuda", generator=g) * 0.02).bfloat16()  # noqa: E731
    up, down = randn(E, INTER, HIDDEN), randn(E, HIDDEN, INTER)
    shared_up, shared_down = randn(SHARED, HIDDEN), randn(HIDDEN, SHARED)
    parts = SHARED // INTER
    results: dict = {"device": torch.cuda.get_device_name()}
    for batch in (1, 8) if "experts" in parts_wanted else ():
        x = randn(batch, HIDDEN)
        h = randn(batch * (TOPK + parts), INTER)
        routings = [torch.stack([torch.randperm(E, device="cuda", generator=g)[:TOPK] for _ in range(batch)]).reshape(-1)
                    for _ in range(ROUTINGS)]

        def up_call(cfg, x=x, routings=routings, batch=batch):
            for ids in routings:
                triton_experts._gemv(x, up, ids, row_div=TOPK, relu2=True, tokens=batch, shared_w=shared_up,
                                     parts=parts, split_rows=True, config=cfg)

        def down_call(cfg, h=h, routings=routings, batch=batch):
            for ids in routings:
                triton_experts._gemv(h, down, ids, row_div=None, relu2=False, tokens=batch, shared_w=shared_down,
                                     parts=parts, split_rows=False, config=cfg)

        for name, call, nbytes in (("up", up_call, INTER * HIDDEN * 2 * (TOPK + parts) * batch),
                                   ("down", down_call, INTER * HIDDEN * 2 * (TOPK + parts) * batch)):
            rows = _time(call, CONFIGS)
            for r in rows:
                if "us" in r:
                    r["tb_s"] = round(nbytes / r["us"] / 1e6, 2)  # (distinct experts at b8 are fewer: upper bound)
            results[f"{name} b{batch}"] = rows
            ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
            print(f"{name} b{batch}: autotuned {rows[0].get('us')} us; best:", flush=True)
            for r in ok[:5]:
                print("   ", r, flush=True)
    # Dense projections at one row, with the residual where the model adds one: cuBLAS (F.linear, or
    # the in-place addmm_ the model uses) against the split-K GEMV (autotuned, and each of its configs). Weight copies rotate so that L2 does not hold them.
    from nemotron_core.ops import triton_gemv

    dense_shapes = (("in_proj", 10304, HIDDEN, False, 8), ("out_proj+residual", HIDDEN, 4096, True, 8),
                    ("qkv", 4608, HIDDEN, False, 8), ("lm_head", 131072, HIDDEN, False, 2))
    for name, n, k, add, copies in dense_shapes if "dense" in parts_wanted else ():
        ws = [randn(n, k) for _ in range(copies)]
        x, res = randn(1, k), randn(1, n)

        def run(fn, ws=ws):
            return graph_time_us(lambda: [fn(w) for w in ws], reps=max(1, 16 // len(ws))) / len(ws)

        row = {
            "cublas": run(lambda w: res.addmm_(x, w.t()) if add else torch.nn.functional.linear(x, w)),
            "split-K autotuned": run(lambda w: triton_gemv.gemv(x, w, res if add else None)),
        }
        for bn, bk, sp, warps, st in triton_gemv._CONFIGS:
            cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": sp, "num_warps": warps, "num_stages": st}
            row[f"split-K {bn}x{bk} split={sp} w={warps} st={st}"] = run(
                lambda w, cfg=cfg: triton_gemv.gemv(x, w, res if add else None, config=cfg))
        row = {key: round(v, 2) for key, v in row.items()}
        results[f"dense {name} b1"] = row
        print(f"dense {name} b1 (us):", row, flush=True)
        del ws
        torch.cuda.empty_cache()
    if "prompt" in parts_wanted:
        prompt_experts(results, randn, up, down)
    if "prompt_configs" in parts_wanted:
        prompt_configs(results, randn, up, down)
    if "small" in parts_wanted:
        small_kernels(results, randn)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
