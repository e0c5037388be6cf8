"""Does reading a decode GEMV's weights into L2 ahead of time, while small kernels run, make it faster?

A decode step's GEMVs are separated by chains of small kernels during which HBM idles. This times,
in CUDA graphs, a GEMV (the Nano model's out_proj, 2688 x 4096 bf16, 22 MB; ``triton_gemv``) behind a
spin kernel standing in for those small kernels, with its weights fetched on a side stream in
several ways: Hopper's bulk L2 prefetch (``cp.async.bulk.prefetch.L2``, one instruction per 16 KB),
one ``prefetch.global.L2`` per 128-byte line, and plain loads that keep the lines (evict_last). 8 weight copies rotate so that
L2 does not hold a copy from the previous use. It also times the GEMV on an L2-resident copy
(the best a prefetch can do) and two spins on two streams (that the branches do run concurrently).

    python benchmarks/gpu_l2.py [--out l2.json]
"""
from __future__ import annotations

import argparse
import json

import torch

from gpu_gemv import graph_time_us


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def bulk_prefetch(ptr, nbytes, CHUNK: tl.constexpr, LANES: tl.constexpr):
        offs = (tl.program_id(0) * LANES + tl.arange(0, LANES)).to(tl.int64) * CHUNK
        size = (tl.minimum(nbytes - offs, CHUNK) // 16 * 16).to(tl.int32)  # <= 0 past the end
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [ptr + offs, size], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def line_prefetch(ptr, nbytes, LINES: tl.constexpr):
        offs = (tl.program_id(0) * LINES + tl.arange(0, LINES)).to(tl.int64) * 128
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
            "=r,l,r", [ptr + offs, (offs < nbytes).to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def touch(ptr, n, sink_ptr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(ptr + offs, mask=offs < n, other=0, eviction_policy="evict_last")
        total = tl.sum(v, axis=0)
        if total == 0x7FFF1234:  # never (in practice): keeps the loads alive
            tl.store(sink_ptr, total)

    return bulk_prefetch, line_prefetch, touch, triton.cdiv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--spin-us", type=float, action="append", default=None)
    args = ap.parse_args()
    from nemotron_core.ops import triton_gemv

    bulk_prefetch, line_prefetch, touch, cdiv = _kernels()
    copies = [torch.randn(2688, 4096, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(8)]
    x = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    sink = torch.zeros(1, device="cuda", dtype=torch.int32)
    side = torch.cuda.Stream()
    khz = torch.cuda.get_device_properties(0).clock_rate
    props = torch.cuda.get_device_properties(0)
    results: dict = {"device": props.name, "l2_bytes": getattr(props, "L2_cache_size", None), "rows": []}

    def fork(fn):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()

    def bulk(w):
        n = w.numel() * w.element_size()
        fork(lambda: bulk_prefetch[(cdiv(n, 16384 * 32),)](w.view(-1).view(torch.uint8), n, CHUNK=16384, LANES=32,
                                                           num_warps=1))

    def lines(w):
        n = w.numel() * w.element_size()
        fork(lambda: line_prefetch[(cdiv(n, 128 * 1024),)](w.view(-1).view(torch.uint8), n, LINES=1024, num_warps=4))

    def loads(w):
        flat = w.view(-1).view(torch.int32)
        fork(lambda: touch[(cdiv(flat.numel(), 8192),)](flat, flat.numel(), sink, BLOCK=8192, num_warps=8))

    def timed(name: str, body) -> None:
        def fn():
            fork(lambda: None)  # (the side stream joins every capture, so the join below is always valid)
            body()
            torch.cuda.current_stream().wait_stream(side)

        us = graph_time_us(fn, reps=20) / len(copies)
        results["rows"].append({"name": name, "us": round(us, 2)})
        print(f"{name:<40} {us:7.2f} us per iteration", flush=True)

    timed("GEMV, rotating copies (cold)", lambda: [triton_gemv.gemv(x, w) for w in copies])
    timed("GEMV, one copy (L2-resident)", lambda: [triton_gemv.gemv(x, copies[0]) for _ in copies])
    for fetch_name, fetch in (("bulk", bulk), ("lines", lines), ("loads", loads)):
        timed(f"{fetch_name} fetch, then GEMV at once", lambda f=fetch: [(f(w), triton_gemv.gemv(x, w)) for w in copies])
    for spin_us in args.spin_us or [7.0, 14.0]:
        cycles = int(spin_us * 1e-6 * khz * 1e3)
        timed(f"spin {spin_us:g} us alone", lambda c=cycles: [torch.cuda._sleep(c) for _ in copies])
        timed(f"spin {spin_us:g} us on two streams", lambda c=cycles: [
            (fork(lambda: torch.cuda._sleep(c)), torch.cuda._sleep(c)) for _ in copies])
        timed(f"spin {spin_us:g} us + GEMV", lambda c=cycles: [
            (torch.cuda._sleep(c), triton_gemv.gemv(x, w)) for w in copies])
        for fetch_name, fetch in (("bulk", bulk), ("lines", lines), ("loads", loads)):
            timed(f"{fetch_name} fetch, spin {spin_us:g} us + GEMV", lambda c=cycles, f=fetch: [
                (f(w), torch.cuda._sleep(c), triton_gemv.gemv(x, w)) for w in copies])
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
