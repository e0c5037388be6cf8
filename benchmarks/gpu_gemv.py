"""Decode-time projections on one GPU: cuBLAS against our Triton GEMV kernels, same run, same inputs.

At decode every projection is bound by reading its weights once. For the Nano-30B-A3B shapes this
times, as 100 replays of a CUDA graph (no launch overhead, as in the decode graph):

* each dense projection at one row: ``F.linear`` (cuBLAS, often a split-K GEMM plus a
  reduction kernel) against ``triton_gemv.gemv`` (autotuned; ``TRITON_PRINT_AUTOTUNING=1``
  shows its pick), and the residual-adding form: ``addmm`` (a copy plus the GEMM) against the GEMV
  with the residual in its epilogue;
* the MoE block's experts at batch 1 and 8: the routed-expert GEMV plus the shared expert on cuBLAS
  (up GEMM, relu2, down ``addmm`` with the residual), against one ``gemv_experts`` call that runs the
  shared expert as two more experts and adds the residual in its combine.

It decides which path the model should take for small-M projections.

    python benchmarks/gpu_gemv.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from nemotron_core.ops import triton_experts, triton_gemv

DENSE = {"mamba in_proj": (10304, 2688), "mamba out_proj": (2688, 4096), "shared up": (3712, 2688),
         "shared down": (2688, 3712), "q_proj": (4096, 2688), "k_proj": (256, 2688), "o_proj": (2688, 4096),
         "lm_head": (131072, 2688)}


def graph_time_us(fn, reps: int = 100) -> float:
    """Mean time of ``fn`` replayed ``reps`` times in one CUDA graph (after an eager warm-up that
    compiles and autotunes outside the capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def dense(results: dict) -> None:
    """Each dense projection at one row (the decode GEMV takes single rows only): cuBLAS against
    ``triton_gemv.gemv``, plain and with the residual added."""
    for name, (n, k) in DENSE.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        gb = n * k * 2 / 1e9
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
        err = max(rel(triton_gemv.gemv(x, w), F.linear(x, w)),
                  rel(triton_gemv.gemv(x, w, residual=r), torch.addmm(r, x, w.t())))
        row = {"cublas_us": graph_time_us(lambda: F.linear(x, w)),
               "ours_us": graph_time_us(lambda: triton_gemv.gemv(x, w)),
               "cublas_addmm_us": graph_time_us(lambda: torch.addmm(r, x, w.t())),
               "ours_residual_us": graph_time_us(lambda: triton_gemv.gemv(x, w, residual=r)),
               "max_rel_err": err}
        row.update({key.replace("_us", "_TBs"): gb / v * 1e3 for key, v in list(row.items()) if key.endswith("_us")})
        results[f"{name} N={n} K={k} M=1"] = row
        print(f"{name:15s} N={n:6d} K={k}: cuBLAS {row['cublas_us']:6.1f} us ({row['cublas_TBs']:.2f} TB/s) "
              f"ours {row['ours_us']:6.1f} us ({row['ours_TBs']:.2f}) | +residual: addmm "
              f"{row['cublas_addmm_us']:6.1f} ours {row['ours_residual_us']:6.1f} | err {err:.1e}", flush=True)


def experts(results: dict) -> None:
    hidden, inter, n_exp, top_k = 2688, 1856, 128, 6
    g = torch.Generator(device="cuda").manual_seed(0)
    up = torch.randn(n_exp, inter, hidden, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    down = torch.randn(n_exp, hidden, inter, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    s_up = torch.randn(2 * inter, hidden, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    s_down = torch.randn(hidden, 2 * inter, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    for m in (1, 8):
        x = torch.randn(m, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        r = torch.randn(m, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        idx = torch.rand(m, n_exp, device="cuda", generator=g).argsort(-1)[:, :top_k].contiguous()
        wts = torch.rand(m, top_k, device="cuda", generator=g)

        def separate() -> torch.Tensor:
            shared = torch.addmm(r, F.relu(F.linear(x, s_up)).square(), s_down.t())
            return triton_experts.gemv_experts(x, idx, wts, up, down, shared)

        def fused() -> torch.Tensor:
            return triton_experts.gemv_experts(x, idx, wts, up, down, r, shared_mlp=(s_up, s_down))

        distinct = idx.unique().numel()
        gb = (distinct * 2 * inter * hidden + 2 * 2 * inter * hidden) * 2 / 1e9
        row = {"separate_us": graph_time_us(separate), "fused_us": graph_time_us(fused),
               "max_rel_err": rel(fused(), separate()), "distinct_experts": distinct}
        row.update({"separate_TBs": gb / row["separate_us"] * 1e3, "fused_TBs": gb / row["fused_us"] * 1e3})
        results[f"MoE experts + shared, batch {m}"] = row
        print(f"experts+shared batch {m}: separate (shared on cuBLAS) {row['separate_us']:.1f} us "
              f"({row['separate_TBs']:.2f} TB/s), fused {row['fused_us']:.1f} us ({row['fused_TBs']:.2f} TB/s), "
              f"err {row['max_rel_err']:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name()}
    experts(results)
    dense(results)
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
