"""Prefill attention on one GPU: which SDPA backend is fastest for the Nano-30B-A3B attention shape.

Causal GQA, 32 query heads and 2 KV heads of 128, bf16, batch 1, at 2048 / 8192 tokens; forward
only (prefill) and forward + backward (training). At 8192 tokens the 8192-token prefill profile
showed cuDNN's kernel at about 290 TFLOP/s; this times each backend torch offers on the same inputs
(with K/V expanded to 32 heads where a backend lacks GQA) and checks they agree.

    python benchmarks/gpu_attention.py
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_ms(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    results = {}
    for seq in (2048, 8192):
        q = torch.randn(1, 32, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, 2, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, 2, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        flops = 4 * seq * seq * 32 * 128 / 2  # causal forward
        ref = None
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            for gqa in (True, False):
                kk, vv = (k, v) if gqa else (k.repeat_interleave(16, 1), v.repeat_interleave(16, 1))
                key = f"{name}{'' if gqa else ' (K/V expanded)'} seq={seq}"

                def fwd():
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

                def fwd_bwd():
                    fwd().sum().backward(retain_graph=True)

                try:
                    with torch.no_grad():
                        out = fwd()
                        f_ms = time_ms(fwd)
                    fb_ms = time_ms(fwd_bwd, reps=5)
                except RuntimeError as e:
                    results[key] = {"error": str(e).splitlines()[0][:160]}
                    print(key, "n/a", flush=True)
                    continue
                ref = out if ref is None else ref
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                results[key] = {"fwd_ms": f_ms, "fwd_tflops": flops / f_ms / 1e9, "fwd_bwd_ms": fb_ms,
                                "max_rel_diff_vs_first": err}
                print(f"{key:40s} fwd {f_ms:7.3f} ms ({flops / f_ms / 1e9:5.0f} TFLOP/s)  fwd+bwd {fb_ms:7.3f} ms"
                      f"  diff {err:.1e}", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
