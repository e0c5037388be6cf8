"""Would a persistent kernel beat a chain of early-launched kernels at batch-1 decode?

The batch-1 decode step spends about 0.75 ms a step beyond the 1.5 ms its weights take to read, a
fixed cost of about 3 us per kernel (BENCHMARKS.md). Starting each kernel early with programmatic
dependent launch (PDL) and loading weights before waiting won back 0.17 ms; folding small kernels
into the tails of others and starting more kernels early did not pay (eighth session). What is left
is a persistent kernel: programs that stay on the GPU across the dependencies, load the next
layer's weights while the previous layer finishes, and wait on a counter in memory instead of a
kernel boundary. Before building one for the model, this measures the idea on the simplest case
that has the step's shape: a chain of L dependent single-row GEMVs ``x_{l+1} = W_l x_l`` (bf16, D x D
weights, L copies so that nothing stays in L2), in CUDA graphs:

* ``plain``: one kernel per layer, each program loading its weight rows into registers and then x;
* ``pdl``: the same kernels launched with PDL, each signalling at its start, so the next one's
  programs load their weights before ``gdc_wait`` (what the model's ``gemv_preload`` does);
* ``persistent``: one kernel for the whole chain; program p owns row blocks p, p + P, ... of every
  layer, loads its first block's weights for layer l, then spins until all row blocks of layer l - 1
  are counted done, reads x_l from L2, and counts its blocks of layer l done. Every program must be
  resident at once (P is at most the SMs times the programs an SM holds), or it would wait forever:
  the spin gives up after a bound and the run is reported as failed.
* ``library``: the model's split-K GEMV (``triton_gemv.gemv``), for scale.

Reported per layer: microseconds and the bandwidth reached, against the bytes at 4.3 TB/s. The
persistent kernel's counters are zeroed by a memset at the start of each chain (timed with it).

    python benchmarks/gpu_persistent.py [--layers 32] [--dims 2048,4096] [--out persistent.json]
"""
from __future__ import annotations

import argparse
import json

import torch

from gpu_gemv import graph_time_us, rel

HBM_TB_S = 4.3  # what the H200's large copies reach (BENCHMARKS.md)
PRELOAD_BYTES = 64 * 1024  # weights a program holds in registers (8 warps: 64 registers a thread)
# Polls of a counter before a persistent program gives up (a deadlock guard): a layer's wait takes a
# few microseconds, i.e. tens of polls; 65k polls is tens of milliseconds.
SPIN_LIMIT = 1 << 16


def _kernels():
    import triton
    import triton.language as tl
    from triton.language.extra import cuda as tcuda

    @triton.jit
    def _rows(x_ptr, w_ptr, out_ptr, block, D: tl.constexpr, BLOCK_N: tl.constexpr):
        """``out[rows] = W[rows] @ x`` for the rows of ``block`` (weights loaded here)."""
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, D)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * D + offs_k[None, :])
        x = tl.load(x_ptr + offs_k, cache_modifier=".cg").to(tl.float32)
        tl.store(out_ptr + offs_n, tl.sum(w.to(tl.float32) * x[None, :], axis=1).to(out_ptr.dtype.element_ty))

    @triton.jit
    def layer_gemv(x_ptr, w_ptr, out_ptr, D: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        # One layer; program = one row block. Under PDL: signal the next layer's kernel at once, load
        # the weights, and only then wait for the previous layer (which wrote x).
        if PDL:
            tcuda.gdc_launch_dependents()
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, D)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * D + offs_k[None, :])
        if PDL:
            tcuda.gdc_wait()
        x = tl.load(x_ptr + offs_k).to(tl.float32)
        tl.store(out_ptr + offs_n, tl.sum(w.to(tl.float32) * x[None, :], axis=1).to(out_ptr.dtype.element_ty))

    @triton.jit
    def persistent_chain(x_ptr, w_ptr, cnt_ptr, fail_ptr, L: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCKS: tl.constexpr, PER: tl.constexpr, SPIN: tl.constexpr):
        # x_ptr: [L + 1, D] activations (row 0 the input); w_ptr: [L, D, D]; cnt_ptr: [L] row blocks
        # done per layer (zero at the start); program p owns row blocks p + i * P, i < PER.
        p = tl.program_id(0)
        P = tl.num_programs(0)
        offs_k = tl.arange(0, D)
        w_layer = w_ptr
        for layer in range(L):  # (L a constexpr: Triton's interpreter cannot loop to a runtime bound)
            # The first block's weights first: they do not depend on the previous layer.
            offs_n = p * BLOCK_N + tl.arange(0, BLOCK_N)
            w = tl.load(w_layer + offs_n[:, None].to(tl.int64) * D + offs_k[None, :])
            if layer > 0:
                polls = 0
                done = tl.atomic_add(cnt_ptr + layer - 1, 0, sem="acquire")
                while (done < BLOCKS) & (polls < SPIN):
                    done = tl.atomic_add(cnt_ptr + layer - 1, 0, sem="acquire")
                    polls += 1
                if done < BLOCKS:
                    tl.atomic_xchg(fail_ptr, 1)
            x = tl.load(x_ptr + layer * D + offs_k, cache_modifier=".cg").to(tl.float32)
            out = x_ptr + (layer + 1) * D
            tl.store(out + offs_n, tl.sum(w.to(tl.float32) * x[None, :], axis=1).to(x_ptr.dtype.element_ty))
            for i in tl.static_range(1, PER):  # the program's other blocks stream after the wait
                _rows(x_ptr + layer * D, w_layer, out, p + i * P, D, BLOCK_N)
            tl.debug_barrier()  # every thread's stores before the count (released at GPU scope)
            tl.atomic_add(cnt_ptr + layer, PER, sem="release")
            w_layer += D * D  # (pointer arithmetic: 64-bit)

    globals().update(_rows=_rows, tcuda=tcuda)  # (Triton's interpreter resolves names here)
    return layer_gemv, persistent_chain, triton.cdiv


def _reference(x0: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The chain in fp32 products, rounded to bf16 after each layer, as the kernels do."""
    from nemotron_core.ops.triton_gemv import gemv_reference

    x = x0
    for w in weights:
        x = gemv_reference(x, w)
    return x


def _resident_programs(kernel, sms: int) -> int:
    """How many programs of a compiled kernel (``_init_handles`` done) the GPU holds at once, from its
    registers, shared memory and threads."""
    props = torch.cuda.get_device_properties(0)
    threads = 32 * kernel.metadata.num_warps
    by_regs = 65536 // max(1, kernel.n_regs * threads)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    by_smem = smem // kernel.metadata.shared if kernel.metadata.shared else by_regs
    by_threads = 2048 // threads
    return sms * max(0, min(by_regs, by_smem, by_threads))


def chain(d: int, layers: int, results: dict) -> None:
    from nemotron_core.ops import triton_gemv

    layer_gemv, persistent_chain, cdiv = _kernels()
    block_n = max(1, PRELOAD_BYTES // (2 * d))
    blocks = cdiv(d, block_n)
    g = torch.Generator(device="cuda").manual_seed(d)
    weights = (torch.randn(layers, d, d, device="cuda", generator=g) / d ** 0.5).bfloat16()
    xs = torch.zeros(layers + 1, d, device="cuda", dtype=torch.bfloat16)
    xs[0] = torch.randn(d, device="cuda", generator=g).bfloat16()
    want = _reference(xs[0], weights)
    floor_us = d * d * 2 / (HBM_TB_S * 1e12) * 1e6
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def report(name: str, us_chain: float, out: torch.Tensor) -> None:
        """One variant's row; then the activations are cleared, so the next variant's check cannot
        pass on what this one wrote."""
        per = us_chain / layers
        row = {"dim": d, "layers": layers, "variant": name, "us_per_layer": round(per, 2),
               "tb_s": round(d * d * 2 / per / 1e6, 2), "floor_us": round(floor_us, 2), "rel_err": rel(out, want)}
        results["rows"].append(row)
        print(f"D={d:<5} {name:<34} {per:7.2f} us a layer ({row['tb_s']:.2f} TB/s; floor {floor_us:.2f} us)"
              f"  rel err {row['rel_err']:.1e}", flush=True)
        xs[1:].zero_()

    for pdl in (False, True):
        def run(pdl=pdl) -> None:
            for layer in range(layers):
                layer_gemv[(blocks,)](xs[layer], weights[layer], xs[layer + 1], D=d, BLOCK_N=block_n, PDL=pdl,
                                      num_warps=8, launch_pdl=pdl)
        report("pdl" if pdl else "plain", graph_time_us(run, reps=5), xs[layers])

    last: list[torch.Tensor] = []

    def library() -> None:
        x = xs[0]
        for layer in range(layers):
            x = triton_gemv.gemv(x, weights[layer])
        last[:] = [x]  # (after the replays: the last captured chain's output)
    report("library GEMV (triton_gemv.gemv)", graph_time_us(library, reps=5), last[0])

    cnt = torch.zeros(layers, device="cuda", dtype=torch.int32)
    fail = torch.zeros(1, device="cuda", dtype=torch.int32)
    for per in (1, 2, 4):
        if blocks % per:
            continue
        programs = blocks // per
        compiled = persistent_chain.warmup(xs, weights, cnt, fail, L=layers, D=d, BLOCK_N=block_n, BLOCKS=blocks,
                                           PER=per, SPIN=SPIN_LIMIT, grid=(programs,), num_warps=8)
        compiled._init_handles()
        resident = _resident_programs(compiled, sms)
        name = f"persistent, {programs} programs x {per} blocks"
        if programs > resident:
            print(f"D={d:<5} {name:<34} skipped: {programs} programs, {resident} resident at most", flush=True)
            results["rows"].append({"dim": d, "variant": name, "skipped": f"{programs} > {resident} resident"})
            continue

        def run(programs=programs, per=per) -> None:
            cnt.zero_()
            persistent_chain[(programs,)](xs, weights, cnt, fail, L=layers, D=d, BLOCK_N=block_n, BLOCKS=blocks,
                                          PER=per, SPIN=SPIN_LIMIT, num_warps=8)
        run()  # once, eagerly: a chain whose programs wait in vain is not timed
        torch.cuda.synchronize()
        us = graph_time_us(run, reps=5) if not fail.item() else 0.0
        if fail.item():
            print(f"D={d:<5} {name:<34} FAILED: a program gave up waiting (not all resident?)", flush=True)
            results["rows"].append({"dim": d, "variant": name, "failed": True})
            fail.zero_()
            continue
        report(name, us, xs[layers])
    memset = graph_time_us(lambda: cnt.zero_(), reps=20)
    results["rows"].append({"dim": d, "variant": "counter memset", "us": round(memset, 2)})
    print(f"D={d:<5} {'(counter memset, per chain)':<34} {memset:7.2f} us", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dims", default="2048,4096")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(), "hbm_tb_s": HBM_TB_S, "rows": []}
    for d in (int(v) for v in args.dims.split(",")):
        chain(d, args.layers, results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
