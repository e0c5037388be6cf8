"""Can a decode GEMV read its weights while the kernel before it still runs?

Each decode GEMV costs about 3.3 us besides its bytes, and finds HBM idle during the small kernels
before it (``BENCHMARKS.md``). With programmatic dependent launch the next kernel may start once every
program of the current one has signalled (``gdc_launch_dependents``); it must then wait
(``gdc_wait``) before reading anything the current one writes. Weights are written by nobody, so a
GEMV whose programs load their whole weight slice into registers *before* ``gdc_wait`` streams them
during its predecessor. This times, in CUDA graphs, the out_proj shape (2688 x 4096 bf16, 22 MB; 8
copies rotating so L2 does not hold them) behind a spin kernel of 64 programs standing in for the
fused Mamba step (about 6 us): the split-K GEMV of ``ops/triton_gemv.py`` against its register-preload
GEMV (``gemv_preload``) over a few tile configs, launched plainly and with PDL.

    python benchmarks/gpu_pdl.py [--out pdl.json]
"""
from __future__ import annotations

import argparse
import json

import torch

from gpu_gemv import graph_time_us

N, K = 2688, 4096
CONFIGS = [(16, 4, 4), (8, 4, 4), (16, 8, 4), (32, 4, 8), (16, 2, 8), (32, 8, 4)]  # BLOCK_N, SPLIT, warps


def _kernels():
    import triton
    import triton.language as tl
    from triton.language.extra import cuda as tcuda

    @triton.jit
    def spin(out_ptr, ns, TRIGGER: tl.constexpr):
        if TRIGGER:
            tcuda.gdc_launch_dependents()
        start = tcuda.globaltimer()
        now = start
        while now - start < ns:
            now = tcuda.globaltimer()
        tl.store(out_ptr + tl.program_id(0), (now - start).to(tl.int32))

    return spin, triton.cdiv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--spin-us", type=float, default=6.0)
    args = ap.parse_args()
    from nemotron_core.ops import triton_gemv

    spin, cdiv = _kernels()
    triton_gemv._kernel()
    gemv_preload = triton_gemv._preload[0]  # the library's register-preload GEMV
    g = torch.Generator(device="cuda").manual_seed(0)
    copies = [(torch.randn(N, K, device="cuda", generator=g) * 0.02).bfloat16() for _ in range(8)]
    x = torch.randn(K, device="cuda", generator=g).bfloat16()
    out = torch.empty(N, device="cuda", dtype=torch.bfloat16)
    part = torch.empty(8, N, device="cuda", dtype=torch.float32)
    count = torch.zeros(4096, device="cuda", dtype=torch.int32)
    sink = torch.zeros(64, device="cuda", dtype=torch.int32)
    ns = int(args.spin_us * 1e3)
    results: dict = {"device": torch.cuda.get_device_name(), "spin_us": args.spin_us, "rows": []}

    def preload(w, bn, split, warps, pdl):
        gemv_preload[(cdiv(N, bn), split)](x, w, out, out, part, count, N, K, w.stride(0), BLOCK_N=bn, SPLIT=split,
                                          RELU2=False, HAS_RES=False, PDL=pdl, num_warps=warps, launch_pdl=pdl)

    def timed(name, body):
        us = graph_time_us(body, reps=20) / len(copies)
        results["rows"].append({"name": name, "us": round(us, 2)})
        print(f"{name:<52} {us:7.2f} us per iteration", flush=True)

    want = triton_gemv.gemv_reference(x, copies[0])
    timed("spin alone", lambda: [spin[(64,)](sink, ns, TRIGGER=False) for _ in copies])
    timed("split-K GEMV alone", lambda: [triton_gemv.gemv(x, w) for w in copies])
    timed("spin + split-K GEMV", lambda: [(spin[(64,)](sink, ns, TRIGGER=False), triton_gemv.gemv(x, w))
                                          for w in copies])
    for bn, split, warps in CONFIGS:
        tag = f"{bn}x{K // split} split={split} w={warps}"
        try:
            preload(copies[0], bn, split, warps, False)
            err = ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()
            timed(f"preload GEMV alone, {tag} (rel err {err:.1e})",
                  lambda: [preload(w, bn, split, warps, False) for w in copies])
            timed(f"spin + preload GEMV, {tag}", lambda: [
                (spin[(64,)](sink, ns, TRIGGER=False), preload(w, bn, split, warps, False)) for w in copies])
            timed(f"spin (trigger) + PDL preload GEMV, {tag}", lambda: [
                (spin[(64,)](sink, ns, TRIGGER=True), preload(w, bn, split, warps, True)) for w in copies])
            preload(copies[0], bn, split, warps, True)
            torch.cuda.synchronize()
            err = ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()
            results["rows"].append({"name": f"PDL result {tag}", "rel_err": err})
        except Exception as e:  # noqa: BLE001 - report, go on
            print(f"{tag}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            results["rows"].append({"name": tag, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
