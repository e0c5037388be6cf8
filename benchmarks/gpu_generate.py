"""Generation and prefill speed on one GPU: ours and transformers in the same run.

Shape: Nemotron 3 Nano 30B-A3B (preset ``nemotron-3-nano-30b-a3b``) with random bf16 weights.
Measured, for each implementation:
  * generate, batch 1, prompt 128, 64 new tokens: tokens/s = new tokens / wall time of the call
  * generate, batch 8, prompt 128, 32 new tokens: tokens/s = 8 * 32 / wall time of the call
  * prefill of 8192 tokens (forward with cache, last-position logits): median ms of 3 after warm-up
EOS is disabled so every run produces exactly the requested tokens. Ours runs first, then is freed,
then transformers (both do not fit at once). Results print as a markdown table and go to --out JSON.

Usage (on the GPU machine, mamba-ssm installed):
    python benchmarks/gpu_generate.py --out results.json [--skip-hf] [--preset nemotron-3-nano-30b-a3b]
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench_ours(config, args) -> dict:
    from nemotron_core.backend import mamba_triton_ops
    from nemotron_core.create import random_model
    from nemotron_core.generation import Decoder, SamplingConfig, generate

    model = random_model(config, torch.bfloat16, seed=0, device="cuda").eval()
    res: dict = {"weights_gb": torch.cuda.memory_allocated() / 1e9}
    g = torch.Generator().manual_seed(0)

    def run(batch: int, prompt: int, new: int, compile: bool = False) -> float:
        prompts = torch.randint(3, config.vocab_size, (batch, prompt), generator=g).tolist()
        cfg = SamplingConfig(max_new_tokens=new, do_sample=False, eos_token_ids=[])
        t0 = time.time()
        dec = Decoder(model, batch, prompt + new, compile=compile)
        generate(model, prompts, cfg, decoder=dec, sync_every=new)  # warm-up + graph capture
        setup_s = time.time() - t0
        wall, out = timed(lambda: generate(model, prompts, cfg, decoder=dec, sync_every=new), repeat=3)
        assert out.generated_tokens == batch * new
        return {"tok_s": batch * new / wall, "wall_s": wall, "prefill_s": out.prefill_seconds,
                "decode_tok_s": batch * (new - 1) / out.decode_seconds, "cuda_graph": out.cuda_graph,
                "peak_gb": (out.peak_memory_bytes or 0) / 1e9, "setup_s": setup_s}

    def variants(suffix: str, fn) -> None:
        """b1 and b8 again under another setting; a failure is reported, the default numbers stay."""
        for key, shape in (("b1", (1, 128, 64)), ("b8", (8, 128, 32))):
            try:
                res[key + suffix] = fn(*shape)
            except Exception as e:
                res[key + suffix] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}

    res["mamba_kernels"] = "triton" if mamba_triton_ops() is not None else "torch"
    res["b1"] = run(1, 128, 64)
    res["b8"] = run(8, 128, 32)
    # The default (linear="auto") sends the single-row projections that measured faster to the Triton
    # GEMV; the same with every projection on cuBLAS, and with every single-row one on the GEMV.
    for choice in ("torch", "triton"):
        model.model.backend.linear = choice
        variants(f"_{choice}_linear", run)
    model.model.backend.linear = "auto"
    if args.profile:
        res["profile_decode_b1"] = profile_decode(model, config)
        res["profile_decode_b8"] = profile_decode(model, config, batch=8)
        res["routing_decode_b8"] = routing_stats(model, config, batch=8)
        res["profile_prefill_128"] = profile_prefill(model, config, 128)
        res["profile_prefill_8x128"] = profile_prefill(model, config, 128, batch=8)
    if args.compile:
        variants("_compiled", lambda *shape: run(*shape, compile=True))
    ids = torch.randint(3, config.vocab_size, (1, 8192), generator=g).cuda()

    def prefill():
        with torch.no_grad():
            dec = pre_dec
            return dec.prefill(ids, torch.ones_like(ids))

    pre_dec = Decoder(model, 1, 8193, cuda_graph=False)
    prefill()
    res["prefill_8192_ms"] = timed(prefill, repeat=3)[0] * 1e3
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            prefill()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40), flush=True)
    del model, pre_dec
    gc.collect()
    torch.cuda.empty_cache()
    return res


def _eager_decoder(model, config, batch: int):
    """An eager (no CUDA graph) decoder after a random 128-token prompt, and a token per row to feed."""
    from nemotron_core.generation import Decoder

    dec = Decoder(model, batch, 256, cuda_graph=False)
    ids = torch.randint(3, config.vocab_size, (batch, 128)).cuda()
    dec.prefill(ids, torch.ones_like(ids))
    return dec, torch.arange(5, 5 + batch, device="cuda")


def profile_decode(model, config, batch: int = 1) -> list[str]:
    """Top CUDA kernels of 10 eager decode steps (where the step time goes)."""
    from torch.profiler import ProfilerActivity, profile

    dec, tok = _eager_decoder(model, config, batch)
    for _ in range(3):
        dec.step(tok)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            dec.step(tok)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=45)
    print(table, flush=True)
    events = prof.key_averages()
    return [f"{e.key[:60]} calls={e.count} total_us={e.device_time_total:.0f}" for e in
            sorted(events, key=lambda e: -e.device_time_total)[:25]]


def routing_stats(model, config, batch: int, steps: int = 10) -> dict:
    """How many distinct routed experts a decode step reads per MoE layer (the ids of every route
    call over ``steps`` eager steps after a 128-token prompt), and the expert bytes that makes per
    step: what bounds a step at this batch."""
    from nemotron_core.ops import triton_moe

    seen: list[int] = []
    route = triton_moe.route_triton

    def counting(*args, **kwargs):
        idx, weights = route(*args, **kwargs)
        seen.append(int(idx.unique().numel()))
        return idx, weights

    dec, tok = _eager_decoder(model, config, batch)
    triton_moe.route_triton = counting
    try:
        for _ in range(steps):
            tok = dec.step(tok).argmax(-1)
    finally:
        triton_moe.route_triton = route
    per_expert = 2 * config.moe_intermediate_size * config.hidden_size * 2  # up + down, bf16
    distinct = statistics.mean(seen) if seen else float("nan")
    out = {"route_calls": len(seen), "distinct_experts_mean": distinct, "distinct_experts_max": max(seen, default=0),
           "routed_expert_gb_per_step": distinct * per_expert * len(seen) / steps / 1e9}
    print(f"routing at batch {batch}:", out, flush=True)
    return out


def profile_prefill(model, config, length: int, batch: int = 1) -> dict:
    """Wall time against GPU time of one short prefill (is it launch- or sync-bound?), top CPU ops and
    kernels."""
    from torch.profiler import ProfilerActivity, profile

    from nemotron_core.generation import Decoder

    dec = Decoder(model, batch, length + 8, cuda_graph=False)
    ids = torch.randint(3, config.vocab_size, (batch, length)).cuda()
    for _ in range(2):
        dec.prefill(ids, torch.ones_like(ids))
    wall = timed(lambda: dec.prefill(ids, torch.ones_like(ids)), repeat=3)[0]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        dec.prefill(ids, torch.ones_like(ids))
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    print(f"prefill {batch} x {length}: wall {wall * 1e3:.1f} ms, GPU kernels {gpu_us / 1e3:.1f} ms", flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=30), flush=True)
    print(events.table(sort_by="cuda_time_total", row_limit=20), flush=True)
    kernels = [f"{e.key[:60]} calls={e.count} total_us={e.self_device_time_total:.0f}" for e in
               sorted(events, key=lambda e: -e.self_device_time_total)[:20]]
    return {"wall_ms": wall * 1e3, "gpu_ms": gpu_us / 1e3, "kernels": kernels}


def bench_hf(config, args) -> dict:
    from nemotron_core.backend import mamba_triton_ops

    mamba_triton_ops()  # lets transformers import mamba_ssm's Triton kernels too (same wheel, no CUDA ext)
    from transformers import NemotronHConfig as HFConfig
    from transformers import NemotronHForCausalLM as HFModel

    hf_cfg = HFConfig(**{k: v for k, v in config.to_dict().items() if k not in ("hybrid_override_pattern",
                                                                                  "mtp_hybrid_override_pattern")})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = HFModel._from_config(hf_cfg, dtype=torch.bfloat16).eval()
    res: dict = {"weights_gb": torch.cuda.memory_allocated() / 1e9}
    g = torch.Generator().manual_seed(0)

    def run(batch: int, prompt: int, new: int) -> dict:
        ids = torch.randint(3, config.vocab_size, (batch, prompt), generator=g).cuda()
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
            torch.cuda.reset_peak_memory_stats()
            wall, out = timed(lambda: model.generate(ids, **kw), repeat=1)
        assert out.shape[1] - prompt == new
        return {"tok_s": batch * new / wall, "wall_s": wall, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}

    res["b1"] = run(1, 128, 64)
    res["b8"] = run(8, 128, 32)
    ids = torch.randint(3, config.vocab_size, (1, 8192), generator=g).cuda()

    def prefill():
        with torch.no_grad():
            return model(ids, use_cache=True, logits_to_keep=1).logits

    prefill()
    res["prefill_8192_ms"] = timed(prefill, repeat=3)[0] * 1e3
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="nemotron-3-nano-30b-a3b")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of eager decode steps")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile'd decode steps")
    args = ap.parse_args()
    from nemotron_core.create import build_config

    config = build_config(args.preset)
    results = {"preset": args.preset, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    results["transformers"] = transformers.__version__
    t = time.time()
    results["ours"] = bench_ours(config, args)
    results["ours"]["bench_s"] = time.time() - t
    print(json.dumps(results, indent=1), flush=True)
    if not args.skip_hf:
        t = time.time()
        results["transformers_ref"] = bench_hf(config, args)
        results["transformers_ref"]["bench_s"] = time.time() - t
    print(json.dumps(results, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    o, h = results["ours"], results.get("transformers_ref", {})
    print("| measurement | ours | transformers |\n|---|---|---|")
    for key, label, unit in (("b1", "generate b1 p128 n64", "tok/s"), ("b8", "generate b8 p128 n32", "tok/s")):
        print(f"| {label} | {o[key]['tok_s']:.1f} {unit} | {h.get(key, {}).get('tok_s', float('nan')):.1f} {unit} |")
        for suffix in ("_torch_linear", "_triton_linear", "_compiled"):
            if key + suffix in o:
                print(f"| {label} ({suffix[1:]}) | {o[key + suffix].get('tok_s', float('nan')):.1f} {unit} | |")
    print(f"| prefill 8192 | {o['prefill_8192_ms']:.1f} ms | {h.get('prefill_8192_ms', float('nan')):.1f} ms |")


if __name__ == "__main__":
    main()
