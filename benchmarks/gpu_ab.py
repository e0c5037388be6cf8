"""A/B of one decode-path switch on the Nano-30B-A3B shape, interleaved in one process.

Separate benchmark runs drift by a few percent (clocks, autotune picks, what ran before), which is
as large as the effects of the switches measured here. This builds the model once, captures one
decoder (CUDA graph) per setting, and then alternates timed ``generate`` calls between the settings,
reporting the median of each. A setting is a name and a function that switches the path on or off
(given the model) before its decoder is captured (the graph keeps what was captured).

    python benchmarks/gpu_ab.py --switch fold_norms [--rounds 5] [--out ab.json]

``--switch null`` runs the same path in both settings: its difference is the A/B's own noise (about
0.1% on the H200, BENCHMARKS.md), the yardstick for a switch's effect.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch


def _fold_norms(model, on: bool) -> None:
    from nemotron_core.modeling import model as modeling

    modeling.FOLD_NORMS = on


def _decode_attn(model, on: bool) -> None:
    from nemotron_core.ops import triton_decode_attn

    triton_decode_attn.ENABLED = on


def _linear(model, on: bool) -> None:
    model.model.backend.linear = "triton" if on else "torch"  # (shared by every Linear)


def _sorted_experts(model, on: bool) -> None:
    from nemotron_core.ops import triton_sorted_experts

    triton_sorted_experts.ENABLED = on


def _shared_ahead(model, on: bool) -> None:
    """The expert up-projection launched with PDL behind the route kernel (its shared-expert programs
    start during the routing), against an ordinary launch."""
    from nemotron_core.ops import triton_experts

    triton_experts.SHARED_AHEAD = on


def _route_pdl(model, on: bool) -> None:
    """The route kernel launched with PDL behind the router's partial logits, against an ordinary launch."""
    from nemotron_core.ops import triton_moe

    triton_moe.ROUTE_PDL = on


def _mamba_early(model, on: bool) -> None:
    """The fused Mamba step launched with PDL behind in_proj's GEMV (loading the SSM state meanwhile),
    against an ordinary launch."""
    from nemotron_core.ops import triton_mamba_step

    triton_mamba_step.EARLY = on


def _down_early(model, on: bool) -> None:
    """The expert down-projection launched with PDL behind the up-projection (its first weight tile
    loaded meanwhile), against an ordinary launch."""
    from nemotron_core.ops import triton_experts

    triton_experts.DOWN_EARLY = on


def _gemv_early(model, on: bool) -> None:
    """The split-K GEMV (in_proj) launched with PDL behind the MoE combine (its first weight tile loaded
    meanwhile), against an ordinary launch."""
    from nemotron_core.ops import triton_gemv

    triton_gemv.EARLY = on


def _route_rows(model, on: bool) -> None:
    """A decode step's route kernel with one row (token) a program, against ~1k scores a program (one
    program for batch 8)."""
    from nemotron_core.ops import triton_moe

    triton_moe.DECODE_ROUTE_ROWS = 1 if on else 0


def _early_tiles(tiles: int):
    def switch(model, on: bool) -> None:
        # in_proj's split-K GEMV loading its first `tiles` weight tiles before it waits, against one.
        from nemotron_core.ops import triton_gemv

        triton_gemv.EARLY_TILES = tiles if on else 1

    return switch


_EXPERT_32 = {"BLOCK_N": 32, "BLOCK_K": 128, "GROUPED": True, "num_warps": 4}
_EXPERT_64 = {**_EXPERT_32, "BLOCK_N": 64}


def _expert_autotuned(model, on: bool) -> None:
    """The expert GEMVs with the autotuner's picks, against every call on grouped 32 x 128 tiles (4 warps),
    the pick recorded for batch 1 on the H200."""
    from nemotron_core.ops import triton_experts

    triton_experts.PIN = False
    triton_experts.FORCE_CONFIG = None if on else _EXPERT_32


def _expert_64(model, on: bool) -> None:
    """The expert GEMVs on grouped 64 x 128 tiles (4 warps), against grouped 32 x 128."""
    from nemotron_core.ops import triton_experts

    triton_experts.FORCE_CONFIG = _EXPERT_64 if on else _EXPERT_32


def _expert_64_256(model, on: bool) -> None:
    """The expert GEMVs on grouped 64 x 256 tiles (8 warps), against grouped 64 x 128 (4 warps)."""
    from nemotron_core.ops import triton_experts

    triton_experts.FORCE_CONFIG = {**_EXPERT_64, "BLOCK_K": 256, "num_warps": 8} if on else _EXPERT_64


def _expert_pin(model, on: bool) -> None:
    """The expert GEMVs on the config pinned for this GPU (``triton_experts.PINNED``), against the
    autotuner's picks."""
    from nemotron_core.ops import triton_experts

    triton_experts.FORCE_CONFIG = None
    triton_experts.PIN = on


def _expert_stages(stages: int):
    def switch(model, on: bool) -> None:
        # The expert GEMVs' pinned config with `stages` software-pipeline stages, against the pinned
        # config (Triton's default, 3).
        from nemotron_core.ops import triton_experts

        triton_experts.FORCE_CONFIG = {**_EXPERT_64, "num_stages": stages} if on else None

    return switch


def _pinned_wide(**change):
    from nemotron_core.ops import triton_gemv

    default = triton_gemv.PINNED  # (read once: a switch's "on" replaces the module's dict)

    def switch(model, on: bool) -> None:
        # The wide split-K GEMVs (in_proj, the LM head) on their pinned config changed by `change`,
        # against the pinned config.
        cap = torch.cuda.get_device_capability()
        triton_gemv.PINNED = {cap: {**default[cap], **change}} if on else default

    return switch


def _against(switch):
    """``switch`` with its settings swapped: "on" is the default."""
    return lambda model, on: switch(model, not on)


def _module_value(module: str, name: str, value):
    import importlib

    mod = importlib.import_module(f"nemotron_core.ops.{module}")
    default = getattr(mod, name)

    def switch(model, on: bool) -> None:
        # A module constant at `value`, against its default.
        setattr(mod, name, value if on else default)

    return switch


def _greedy_in_graph(model, on: bool) -> None:
    """Greedy decoding with the pick and the bookkeeping captured in the step's graph, against the
    plain step's graph with torch ops between replays."""
    from nemotron_core import generation

    generation.GREEDY_IN_GRAPH = on


def _check_logits(model, on: bool) -> None:
    """The decode loop's check of each token's logits for NaN/inf (in the greedy pick's kernel), against
    none."""
    from nemotron_core import generation

    generation.CHECK_DECODE_LOGITS = on


def _free_bound(module: str, name: str, fake):
    """A timing bound, not a path (its tokens are wrong): ``nemotron_core.<module>.<name>`` replaced by
    ``fake(real, *args, **kwargs)``, which returns outputs of the right shapes while skipping work (a
    kernel, or part of one): what that work costs the step at most."""
    import importlib

    mod = importlib.import_module(f"nemotron_core.{module}")
    real = getattr(mod, name)

    def switch(model, on: bool) -> None:
        setattr(mod, name, (lambda *a, **kw: fake(real, *a, **kw)) if on else real)

    return switch


_FAKE_OUT: dict = {}  # (name, shape) -> a tensor made once, outside the graphs' captures


def _fake_route(real, logits, bias, top_k, scaling, norm_topk_prob):
    """Fixed routing at decode: row t takes experts (t * k + j) mod E; no route kernel. (A prompt keeps the
    real routing: its expert kernel's time depends on how even the routing is.)"""
    n, n_exp = logits.shape[-2:]
    if n >= 64:
        return real(logits, bias, top_k, scaling, norm_topk_prob)
    key = ("route", n, top_k, logits.device)
    if key not in _FAKE_OUT:
        ids = (torch.arange(n * top_k, device=logits.device) % n_exp).view(n, top_k)
        _FAKE_OUT[key] = (ids, torch.full((n, top_k), 1.0 / top_k, device=logits.device))
    return _FAKE_OUT[key]


def _unnormed_combine(real, *args, next_norm=None, **kwargs):
    """The decode MoE combine spread over its column blocks without the next block's RMSNorm, its raw
    output passed on as if normalised: what a combine that left the norm to the next projection (in_proj
    applying it on the fly) could save at most."""
    out = real(*args, **kwargs)
    return out if next_norm is None else (out, out)


def _fake_mamba_step(real, zxbcdt, conv_state, conv_weight, conv_bias, ssm_state, *rest, **kw):
    """The Mamba block's decode step skipped: out_proj reads a fixed buffer."""
    bsz, heads, p, _ = ssm_state.shape
    key = ("mamba", bsz, heads * p, zxbcdt.dtype, zxbcdt.device)
    if key not in _FAKE_OUT:
        _FAKE_OUT[key] = torch.zeros(bsz, heads * p, dtype=zxbcdt.dtype, device=zxbcdt.device)
    return _FAKE_OUT[key]


def _null(model, on: bool) -> None:
    """Nothing: both settings are the same path, so their difference is the A/B's own noise."""


def _mamba_step(model, on: bool) -> None:
    from nemotron_core.ops import triton_mamba_step

    triton_mamba_step.ENABLED = on


def _mamba_step_without_mamba_ssm(model, on: bool) -> None:
    """The fused Mamba decode step against the reference ops it replaces where mamba-ssm is absent
    (hidden for the rest of the process: give this switch alone)."""
    from nemotron_core import backend

    backend.mamba_triton_ops = lambda: None
    _mamba_step(model, on)


def _pdl_preload(model, on: bool) -> None:
    """On (the default): at batch 1 the fused Mamba step and the attention combine let the next kernel
    start early, and the output projections' GEMV loads its weights into registers meanwhile (PDL).
    Off: the default before (mamba-ssm's step kernels where installed, the split-K GEMV, no PDL)."""
    from nemotron_core.ops import triton_gemv, triton_mamba_step, triton_moe

    triton_gemv.PRELOAD = triton_moe.PDL = on
    triton_mamba_step.ENABLED = None  # (its default follows PDL)


def _pdl(model, on: bool) -> None:
    """Programmatic dependent launch alone, with the fused Mamba step and the preload GEMV in both
    settings (the same kernels and numbers: only when they may start differs)."""
    from nemotron_core.ops import triton_gemv, triton_mamba_step, triton_moe

    triton_gemv.PRELOAD, triton_mamba_step.ENABLED, triton_moe.PDL = True, True, on


SWITCHES = {
    "pdl_preload": _pdl_preload, "pdl": _pdl, "mamba_step": _mamba_step,
    "mamba_step_without_mamba_ssm": _mamba_step_without_mamba_ssm, "sorted_experts": _sorted_experts,
    "shared_ahead": _shared_ahead, "route_pdl": _route_pdl, "mamba_early": _mamba_early, "down_early": _down_early,
    "gemv_early": _gemv_early, "route_rows": _route_rows, "linear": _linear, "fold_norms": _fold_norms,
    "decode_attn": _decode_attn, "greedy_in_graph": _greedy_in_graph, "null": _null, "check_logits": _check_logits,
    "combine_unnormed_bound": _free_bound("ops.triton_experts", "combine_triton", _unnormed_combine),
    "route_free_bound": _free_bound("ops.triton_moe", "route_triton", _fake_route),
    "mamba_step_free_bound": _free_bound("ops.triton_mamba_step", "mamba_step", _fake_mamba_step),
    "expert_autotuned": _expert_autotuned, "expert_64": _expert_64, "expert_64_256": _expert_64_256,
    # gemv_split1: the pinned one split, against the two splits the autotuner once picked for in_proj.
    "expert_pin": _expert_pin, "gemv_split1": _against(_pinned_wide(SPLIT=2)),
    "gemv_wide_64": _pinned_wide(BLOCK_N=64), "gemv_wide_k256": _pinned_wide(BLOCK_K=256, num_stages=3),
    "router_slice512": _module_value("triton_router", "SLICE_K", 512),
    "router_slice_e16": _module_value("triton_router", "SLICE_E", 16),
    "combine_warps8": _module_value("triton_moe", "NORM_WARPS", 8),
    "combine_warps2": _module_value("triton_moe", "NORM_WARPS", 2),
    "early_tiles2": _early_tiles(2), "early_tiles4": _early_tiles(4), "early_tiles8": _early_tiles(8),
    "expert_stages2": _expert_stages(2), "expert_stages4": _expert_stages(4), "expert_stages5": _expert_stages(5),
    "gemv_wide_s3": _pinned_wide(num_stages=3), "gemv_wide_s5": _pinned_wide(num_stages=5),
}


def _settings(model) -> list:
    """The switchable state (the upper-case names of the modules the switches set, and the model's
    linear backend), so that each switch's A/B ends where it began: the next one measures the default."""
    import importlib

    names = ("generation", "modeling.model", "ops.triton_decode_attn", "ops.triton_experts", "ops.triton_gemv",
             "ops.triton_mamba_step", "ops.triton_moe", "ops.triton_router", "ops.triton_sorted_experts")
    modules = [importlib.import_module(f"nemotron_core.{n}") for n in names]
    state = [(m, k, v) for m in modules for k, v in vars(m).items() if k.isupper()]
    return state + [(model.model.backend, "linear", model.model.backend.linear)]


def _restore(state: list) -> None:
    for owner, name, value in state:
        setattr(owner, name, value)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--switch", choices=sorted(SWITCHES), action="append", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--preset", default="nemotron-3-nano-30b-a3b")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from nemotron_core.create import build_config, random_model
    from nemotron_core.generation import Decoder, SamplingConfig, generate

    config = build_config(args.preset)
    model = random_model(config, torch.bfloat16, seed=0, device="cuda").eval()
    g = torch.Generator().manual_seed(0)
    results: dict = {"device": torch.cuda.get_device_name(), "preset": args.preset}
    defaults = _settings(model)
    for switch in args.switch:
        for batch, new in ((1, 64), (8, 32)):
            _restore(defaults)
            prompts = torch.randint(3, config.vocab_size, (batch, 128), generator=g).tolist()
            cfg = SamplingConfig(max_new_tokens=new, do_sample=False, eos_token_ids=[])
            decoders = {}
            for on in (True, False):
                SWITCHES[switch](model, on)
                decoders[on] = Decoder(model, batch, 128 + new)
                generate(model, prompts, cfg, decoder=decoders[on], sync_every=new)  # capture + warm-up
            SWITCHES[switch](model, True)
            walls: dict[bool, list[float]] = {True: [], False: []}
            tokens: dict[bool, list] = {}
            for _ in range(args.rounds):
                for on in (True, False):
                    # (Set again for each call: a prompt's graph is captured on the second use of its
                    # length bucket, which may be a timed call.)
                    SWITCHES[switch](model, on)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = generate(model, prompts, cfg, decoder=decoders[on], sync_every=new)
                    walls[on].append(time.perf_counter() - t0)
                    tokens[on] = out.sequences
            row = {f"{switch}_{'on' if on else 'off'}_tok_s": round(batch * new / statistics.median(w), 1)
                   for on, w in walls.items()}
            row["same_tokens"] = tokens[True] == tokens[False]
            key, repeat = f"{switch} b{batch}", 2
            while key in results:  # a switch given twice (e.g. null, for the noise) keeps both rows
                key, repeat = f"{switch} b{batch} #{repeat}", repeat + 1
            results[key] = row
            print(f"{switch} b{batch}: {row}", flush=True)
            del decoders
            gc.collect()  # their graphs go now, not during the next capture
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
