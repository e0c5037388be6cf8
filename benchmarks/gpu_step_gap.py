"""What a decode step costs outside its CUDA graph, on the Nano-30B-A3B shape.

``generate`` replays the captured step once per token and, between replays, runs a dozen small
eager kernels: the sampling (argmax), the EOS bookkeeping, the copy of the token into the graph's
input and the position update. This times, per decode step, in one process:

* ``generate``: the decode steps of a ``generate`` call (its ``decode_seconds`` / steps);
* ``replay only``: the same number of back-to-back replays of the captured step, nothing between;
* ``replay + argmax + feed``: replays with only the greedy pick and the copy into the input;

each with the plain step's graph and with the greedy pick captured in the graph
(``generation.GREEDY_IN_GRAPH``). The difference between the first two is what the work between
replays costs a step. ``--trace`` also records one replay's kernels (torch's profiler, CUPTI) and
reports the step's timeline: its span, the time some kernel ran (the union of their intervals), the
idle gaps, and per kernel name the time and the gaps before it; a kernel that starts before the
previous one ends (programmatic dependent launch) has a negative gap.

    python benchmarks/gpu_step_gap.py [--batch 1 8] [--trace] [--out gap.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _per_step(fn, steps: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times)


def _timeline(graph, rewind, replays: int = 3) -> dict:
    """Kernels of the last of ``replays`` graph replays, from the profiler: span, busy union, gaps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    rewind()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
            torch.cuda.synchronize()
            time.sleep(0.002)  # a visible pause between replays: the last one is the kernels after it
    ks = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start),
                key=lambda k: k[0])
    if not ks:
        return {"error": "the profiler recorded no kernels of the graph"}
    # The last replay: kernels after the last pause of more than 1 ms.
    first = max((i for i in range(1, len(ks)) if ks[i][0] - max(k[1] for k in ks[:i]) > 1000), default=0)
    ks = ks[first:]
    busy, end, gaps, per_name = 0.0, ks[0][0], [], {}
    for start, stop, name in ks:
        gap = start - end  # negative: it overlaps the kernels before it
        busy += max(0.0, stop - max(start, end))
        d = per_name.setdefault(name[:60], {"calls": 0, "us": 0.0, "gap_before_us": 0.0})
        d["calls"] += 1
        d["us"] += stop - start
        d["gap_before_us"] += gap
        gaps.append(gap)
        end = max(end, stop)
    top = sorted(per_name.items(), key=lambda kv: -kv[1]["us"])
    return {"kernels": len(ks), "span_us": round(end - ks[0][0], 1), "busy_us": round(busy, 1),
            "idle_us": round(sum(g for g in gaps if g > 0), 1),
            "overlap_us": round(-sum(g for g in gaps if g < 0), 1),
            "per_kernel": {n: {k: round(v, 1) for k, v in d.items()} for n, d in top},
            # Every kernel of the replay in start order: (start, end) in us from the first one's start.
            "sequence": [[round(a - ks[0][0], 2), round(b - ks[0][0], 2), n[:40]] for a, b, n in ks]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--preset", default="nemotron-3-nano-30b-a3b")
    ap.add_argument("--trace", action="store_true", help="also the timeline of one replay (profiler)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from nemotron_core import generation
    from nemotron_core.create import build_config, random_model
    from nemotron_core.generation import Decoder, SamplingConfig, generate

    config = build_config(args.preset)
    model = random_model(config, torch.bfloat16, seed=0, device="cuda").eval()
    g = torch.Generator().manual_seed(0)
    results: dict = {"device": torch.cuda.get_device_name(), "preset": args.preset, "new_tokens": args.new}
    for batch in args.batch:
        prompts = torch.randint(3, config.vocab_size, (batch, 128), generator=g).tolist()
        cfg = SamplingConfig(max_new_tokens=args.new, do_sample=False, eos_token_ids=[])
        steps = args.new - 1
        for fused in (False, True):
            generation.GREEDY_IN_GRAPH = fused
            dec = Decoder(model, batch, 128 + args.new)
            generate(model, prompts, cfg, decoder=dec, sync_every=args.new)  # capture + warm-up
            gen = []
            for _ in range(args.rounds):
                out = generate(model, prompts, cfg, decoder=dec, sync_every=args.new)
                gen.append(out.decode_seconds / steps)
            graph = dec.greedy_graph if fused else dec.graph
            assert graph is not None, "the decode step was not captured"

            def rewind() -> None:
                # The graph moves the position (and the greedy one the record's index): each round
                # starts where generate's decode did, so no write lands past the cache.
                dec.pos.fill_(128)
                dec.index.fill_(1)

            def replays() -> None:
                rewind()
                for _ in range(steps):
                    graph.replay()

            def replays_fed() -> None:
                rewind()
                for _ in range(steps):
                    dec.tokens.copy_(dec.logits.argmax(-1, keepdim=True))
                    graph.replay()

            row = {"generate_ms": statistics.median(gen) * 1e3,
                   "replay_only_ms": _per_step(replays, steps, args.rounds) * 1e3}
            if not fused:
                row["replay_argmax_feed_ms"] = _per_step(replays_fed, steps, args.rounds) * 1e3
            row["outside_graph_ms"] = row["generate_ms"] - row["replay_only_ms"]
            key = f"b{batch}" + (" greedy_in_graph" if fused else "")
            results[key] = {k: round(v, 4) for k, v in row.items()}
            print(f"{key}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
            if args.trace:
                tl = _timeline(graph, rewind)
                results[key]["timeline"] = tl
                summary = {k: v for k, v in tl.items() if k not in ("per_kernel", "sequence")}
                print(f"{key} timeline: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
                for name, d in list(tl.get("per_kernel", {}).items())[:25]:
                    print(f"   {name:60s} {d}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
