"""Training-side speed and memory on one GPU: ours and transformers in the same run.

1. Full training step of a dense Nemotron-H 4B-shaped model (preset ``nemotron-h-4b``), sequence 4096,
   batch 1: fp32 master weights, bf16 autocast compute, fused AdamW with fp32 state (PyTorch AMP).
   Reports tokens/s and MFU = model FLOPs / (step time x 790 TFLOP/s, the H200's measured dense bf16).
   Model FLOPs per token = 6 x (parameters without the embedding table) + causal attention
   (3 x 4 x seq/2 x heads x head_dim per attention layer); the SSD scan's own FLOPs are not counted,
   so MFU is understated slightly.
2. Peak memory of forward + backward, LoRA-style (all weights frozen, gradients flow to the
   input embeddings), Nano-30B-A3B shape in bf16, sequence 4096, with and without gradient
   checkpointing.
3. Packed THD versus padded BSHD forward + backward throughput (real tokens/s) on 8 sequences of
   mixed lengths (150..2048 tokens), 4B shape in bf16 with gradient checkpointing on in both (ours
   only: transformers has no packed path without state leakage).

Usage: python benchmarks/gpu_train.py --out train.json [--skip-hf] [--parts step,memory,packed]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import time
import traceback

import torch

H200_BF16_FLOPS = 790e12


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def flops_per_token(config, seq: int) -> float:
    from nemotron_core.params import count_parameters

    n = count_parameters(config)["total"] - config.vocab_size * config.hidden_size
    attn_layers = sum(t == "full_attention" for t in config.layers_block_type)
    attn = 3 * 4 * (seq / 2) * config.num_attention_heads * config.head_dim * attn_layers
    return 6 * n + attn


def hf_model(config, dtype, device="cuda"):
    from nemotron_core.backend import mamba_triton_ops

    mamba_triton_ops()  # same Triton kernels for transformers (mamba-ssm wheel without CUDA extensions)
    from transformers import NemotronHConfig, NemotronHForCausalLM
    from transformers.models.nemotron_h import modeling_nemotron_h as hf_nemotron

    if importlib.util.find_spec("causal_conv1d") is None and hasattr(hf_nemotron, "mamba2_split_conv1d_scan_combined"):
        # Training without a cache, transformers 5.17 calls mamba-ssm's fused conv+scan, which needs
        # causal-conv1d's CUDA extension (absent here: "'NoneType' object is not callable"). Returning
        # None is its own signal for "no kernel": the mixer then runs its unfused path (torch conv,
        # mamba-ssm's Triton scan), the path it takes with a cache, as in the training-step part.
        hf_nemotron.mamba2_split_conv1d_scan_combined = lambda *args, **kwargs: None

    data = {k: v for k, v in config.to_dict().items() if k not in ("hybrid_override_pattern", "mtp_hybrid_override_pattern")}
    torch.manual_seed(0)
    with torch.device(device):
        return NemotronHForCausalLM._from_config(NemotronHConfig(**data), dtype=dtype)


def train_step_bench(model, config, seq: int, steps: int = 3, warmup: int = 2, profile: bool = False) -> dict:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    ids = torch.randint(3, config.vocab_size, (1, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    first = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    tok_s = seq / dt
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40), flush=True)
    return {"step_s": dt, "tok_s": tok_s, "mfu": tok_s * flops_per_token(config, seq) / H200_BF16_FLOPS,
            "warmup_s": first, "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "loss": float(loss)}


def part_step(args, results) -> None:
    from nemotron_core.create import build_config, random_model

    config = build_config("nemotron-h-4b")
    model = random_model(config, torch.float32, seed=0, device="cuda")
    results["step_ours"] = train_step_bench(model, config, 4096, profile=args.profile)
    print("step ours", results["step_ours"], flush=True)
    del model
    free()
    if args.compile:
        _step_variant("step_ours_compiled", results, lambda: _compiled_blocks(random_model(config, torch.float32, seed=0,
                                                                                           device="cuda")), config)
    if not args.skip_hf:
        _step_variant("step_transformers", results, lambda: hf_model(config, torch.float32), config)


def _compiled_blocks(model):
    # Regional compilation: each block's forward compiled on its own (blocks of one type share the
    # compiled code), so the elementwise work around the GEMMs and kernels fuses.
    for layer in model.model.layers.values():
        layer.compile()
    return model


def _step_variant(key: str, results: dict, make_model, config) -> None:
    """One more training-step measurement; a failure is recorded instead of ending the run."""
    model = None
    try:
        model = make_model()
        results[key] = train_step_bench(model, config, 4096)
    except Exception as e:
        results[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "where": traceback.format_exc()[-800:]}
    print(key, results[key], flush=True)
    del model
    free()


def _hf_layers(model):
    return (getattr(model, "model", None) or model.backbone).layers  # the name differs between 5.x releases


def enable_checkpointing(model, hf: bool) -> str:
    """The model's own switch; for transformers, if that fails (5.17 raised a TypeError on the H200),
    torch's non-reentrant checkpoint wrapper around each decoder block: the same mechanism as ours."""
    if not hf:
        model.gradient_checkpointing_enable()
        return "nemotron gradient_checkpointing_enable"
    try:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return "transformers gradient_checkpointing_enable(use_reentrant=False)"
    except Exception as e:  # noqa: BLE001 - any failure of the library switch
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

        layers = _hf_layers(model)
        for i, block in enumerate(layers):
            layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        return f"torch checkpoint_wrapper per block (gradient_checkpointing_enable: {type(e).__name__})"


def lora_style_peak(model, config, seq: int, checkpointing: bool, hf: bool) -> dict:
    for p in model.parameters():
        p.requires_grad_(False)
    mode = "off"
    if checkpointing:
        mode = enable_checkpointing(model, hf)
    else:
        model.gradient_checkpointing_disable()
        if hf:  # undo the fallback wrappers too
            layers = _hf_layers(model)
            for i, block in enumerate(layers):
                layers[i] = getattr(block, "_checkpoint_wrapped_module", block)
    model.train()
    ids = torch.randint(3, config.vocab_size, (1, seq), device="cuda")
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)

    def run():
        # No cache in training (transformers would otherwise update one, which a recompute would see).
        loss = model(inputs_embeds=emb, labels=ids, **({"use_cache": False} if hf else {})).loss
        loss.backward()

    run()  # warm-up (autotune)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return {"checkpointing": mode, "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "weights_gb": base / 1e9,
            "activations_peak_gb": (torch.cuda.max_memory_allocated() - base) / 1e9,
            "fwd_bwd_s": time.perf_counter() - t}


def part_memory_hf(args, results) -> None:
    """Only the transformers half of part_memory (for a rerun)."""
    from nemotron_core.create import build_config

    _memory_hf(build_config("nemotron-3-nano-30b-a3b"), results)


def _memory_hf(config, results) -> None:
    model = hf_model(config, torch.bfloat16)
    for gc_on in (True, False):
        key = f"memory_transformers_gc_{'on' if gc_on else 'off'}"
        try:
            results[key] = lora_style_peak(model, config, 4096, gc_on, hf=True)
        except Exception as e:
            results[key] = {"error": f"{type(e).__name__}: {str(e)[:200]}", "where": traceback.format_exc()[-800:]}
        print(key, results[key], flush=True)
        free()
    del model
    free()


def part_memory(args, results) -> None:
    from nemotron_core.create import build_config, random_model

    config = build_config("nemotron-3-nano-30b-a3b")
    model = random_model(config, torch.bfloat16, seed=0, device="cuda")
    for gc_on in (True, False):
        key = f"memory_ours_gc_{'on' if gc_on else 'off'}"
        try:
            results[key] = lora_style_peak(model, config, 4096, gc_on, hf=False)
        except torch.OutOfMemoryError as e:
            results[key] = {"error": "OOM " + str(e)[:120]}
        print(key, results[key], flush=True)
        free()
    del model
    free()
    if not args.skip_hf:
        _memory_hf(config, results)


def part_packed(args, results) -> None:
    from nemotron_core.create import build_config, random_model
    from nemotron_core.packing import pack_sequences

    config = build_config("nemotron-h-4b")
    model = random_model(config, torch.bfloat16, seed=0, device="cuda").train()
    model.gradient_checkpointing_enable()  # both layouts, so the padded batch fits at all
    lengths = [256, 1500, 600, 2048, 400, 1250, 150, 900]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, config.vocab_size, (n,), generator=g) for n in lengths]
    real = sum(lengths)
    packed = pack_sequences(seqs)
    kw = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in packed.as_kwargs().items()
          if k not in ("input_ids", "labels")}
    ids_packed = packed.input_ids.cuda()
    width = max(lengths)
    padded = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
        mask[i, : len(s)] = 1
    padded, mask = padded.cuda(), mask.cuda()
    labels = padded.masked_fill(mask == 0, -100)

    def run_packed():
        model(input_ids=ids_packed, labels=packed.labels.cuda(), **kw).loss.backward()

    def run_padded():
        model(input_ids=padded, attention_mask=mask, labels=labels).loss.backward()

    for name, fn in (("packed_thd", run_packed), ("padded_bshd", run_padded)):
        try:
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / 3
            results[name] = {"real_tokens": real, "fwd_bwd_s": dt, "real_tok_s": real / dt}
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(name, results[name], flush=True)
        model.zero_grad(set_to_none=True)
    del model
    free()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--parts", default="step,memory,packed")
    ap.add_argument("--compile", action="store_true", help="also time ours with each block torch.compile'd")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one training step (ours)")
    args = ap.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    results["transformers"] = transformers.__version__
    parts = {"step": part_step, "memory": part_memory, "memory_hf": part_memory_hf, "packed": part_packed}
    for name in args.parts.split(","):
        t = time.time()
        try:
            parts[name](args, results)
        except Exception as e:
            results[name + "_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        results[name + "_bench_s"] = time.time() - t
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
