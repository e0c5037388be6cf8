"""Decode-time matrix-vector products on one GPU: cuBLAS (F.linear) against a Triton GEMV.

At batch 1 every projection is a GEMV bound by reading the weight once; this measures how close
each implementation gets to the memory bandwidth for the Nano-30B-A3B shapes, per config, timed as
100 replays of a CUDA graph (no launch overhead), and the routed-expert GEMV of
``nemotron_core.ops.triton_experts`` (6 experts of 128). It decides whether a Triton GEMV should
replace cuBLAS for small-M projections.

    python benchmarks/gpu_gemv.py
"""
from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def gemv(x_ptr, w_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def graph_time_us(fn, reps: int = 100) -> float:
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


def main() -> None:
    shapes = {"mamba in_proj": (10304, 2688), "mamba out_proj": (2688, 4096), "shared up": (3712, 2688),
              "shared down": (2688, 3712), "q_proj": (4096, 2688), "k_proj": (256, 2688), "lm_head": (131072, 2688)}
    configs = [(bn, bk, w, st) for bn, bk in ((8, 512), (16, 256), (16, 512), (32, 256), (64, 128), (32, 512), (4, 1024))
               for w in (4, 8) for st in (2, 4)]
    results = {}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        gb = n * k * 2 / 1e9
        ref = torch.nn.functional.linear(x, w)
        cublas = graph_time_us(lambda: torch.nn.functional.linear(x, w))
        best = (float("inf"), None)
        for bn, bk, nw, st in configs:
            fn = lambda: gemv[(triton.cdiv(n, bn),)](x, w, out, n, k, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=st)  # noqa: E731
            try:
                fn()
                torch.cuda.synchronize()
                assert (out.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()
                t = graph_time_us(fn)
            except Exception as e:  # a config that does not compile
                print(name, (bn, bk, nw, st), type(e).__name__, file=sys.stderr)
                continue
            if t < best[0]:
                best = (t, (bn, bk, nw, st))
        results[name] = {"cublas_us": cublas, "cublas_TBs": gb / cublas * 1e3,
                         "triton_us": best[0], "triton_TBs": gb / best[0] * 1e3, "triton_config": best[1]}
        print(f"{name:16s} N={n:6d} K={k}: cuBLAS {cublas:7.1f} us ({gb / cublas * 1e3:.2f} TB/s)  "
              f"Triton {best[0]:7.1f} us ({gb / best[0] * 1e3:.2f} TB/s) {best[1]}", flush=True)

    from nemotron_core.ops.triton_experts import gemv_experts

    up = torch.randn(128, 1856, 2688, device="cuda", dtype=torch.bfloat16)
    down = torch.randn(128, 2688, 1856, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 2688, device="cuda", dtype=torch.bfloat16)
    idx = torch.randperm(128, device="cuda")[:6][None]
    wts = torch.rand(1, 6, device="cuda")
    t = graph_time_us(lambda: gemv_experts(x, idx, wts, up, down))
    gb = 6 * 2 * 1856 * 2688 * 2 / 1e9
    results["routed experts (6 of 128, up+down+combine)"] = {"us": t, "TBs": gb / t * 1e3}
    print(f"routed experts: {t:.1f} us ({gb / t * 1e3:.2f} TB/s)")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
