"""Pipeline-parallel stages, applied from outside the model (as torchtitan's splitter does).

A stage is the full model with the parts other stages own set to ``None`` (embeddings, final norm,
``lm_head``, MTP head) or removed (blocks). Layer keys stay the global indices, so a stage's
state-dict names are the full model's names. Between stages travels ``[B, S, H]`` hidden state and,
with an MTP head, the D future-token embeddings the first stage computed (``1 + D`` tensors).
"""
from __future__ import annotations

from typing import Any

import torch

from .errors import InputError


def balanced_layer_split(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges, sizes differing by at most one (earlier stages take the extra)."""
    if not 1 <= num_stages <= num_layers:
        raise InputError(f"cannot split {num_layers} layers into {num_stages} pipeline stages")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        ranges.append(range(start, start + n))
        start += n
    return ranges


def cost_balanced_split(costs: list[int], num_stages: int, first_extra: int = 0, last_extra: int = 0) -> list[range]:
    """Contiguous ranges minimising the largest stage cost (the first and last stage also carry
    ``first_extra`` / ``last_extra``: embeddings, final norm, lm_head, MTP head)."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise InputError(f"cannot split {n} layers into {num_stages} pipeline stages")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, i: int, j: int) -> int:  # layers i..j-1 as stage `stage`
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == num_stages - 1 else 0)
        return prefix[j] - prefix[i] + extra

    inf = float("inf")
    # best[s][j]: minimal max-cost placing layers 0..j-1 on stages 0..s-1; cut[s][j] the last cut.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for j in range(s, n - (num_stages - s) + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], cost(s - 1, i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    ranges, j = [], n
    for s in range(num_stages, 0, -1):
        i = cut[s][j]
        ranges.append(range(i, j))
        j = i
    return ranges[::-1]


def stage_module_names(model, num_stages: int, layers_prefix: str = "model.",
                       splits: list[range] | None = None) -> list[list[str]]:
    """Fully qualified module names each stage owns (the model's hook adds the MTP head last)."""
    names = []
    splits = splits or balanced_layer_split(len(model.model.layers), num_stages)
    keys = list(model.model.layers.keys())
    for s, r in enumerate(splits):
        stage = [f"{layers_prefix}layers.{keys[i]}" for i in r]
        if s == 0:
            stage.insert(0, f"{layers_prefix}embed_tokens")
        if s == num_stages - 1:
            stage += [f"{layers_prefix}norm", "lm_head"]
        names.append(stage)
    return model.customize_pipeline_stage_modules(names, layers_prefix)


def trim_to_stage(model, module_names: list[str]):
    """Keep only ``module_names`` of ``model`` (in place) and return it."""
    owned = set(module_names)
    inner = model.model
    if "model.embed_tokens" not in owned:
        inner.embed_tokens = None
    if "model.norm" not in owned:
        inner.norm = None
    if "lm_head" not in owned:
        model.lm_head = None
    if "mtp" not in owned:
        model.mtp = None
    for key in list(inner.layers.keys()):
        if f"model.layers.{key}" not in owned:
            del inner.layers[key]
    return model


def split_model(model, num_stages: int, splits: list[range] | None = None) -> list[Any]:
    """Split ``model`` into ``num_stages`` stage models (deep copies; build on meta for real sizes)."""
    import copy

    names = stage_module_names(model, num_stages, splits=splits)
    return [trim_to_stage(copy.deepcopy(model), stage) for stage in names]


def _numel(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _bytes(module, dtype: torch.dtype) -> int:
    from .dtypes import target_dtype

    if module is None:
        return 0
    return sum(p.numel() * target_dtype(n, dtype).itemsize for n, p in module.named_parameters())


SCHEDULES = ("1f1b", "gpipe")


def schedule_profile(schedule: str, num_stages: int, microbatches: int) -> dict[str, Any]:
    """Idle fraction and microbatches whose activations a stage holds at once, for the two classic
    schedules (equal stage times assumed). Both idle (p-1)/(m+p-1) of the time; GPipe keeps all m
    microbatches' activations until the backward starts, 1F1B at most p - stage."""
    if schedule not in SCHEDULES:
        raise InputError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if microbatches < 1:
        raise InputError("microbatches must be at least 1")
    p, m = num_stages, microbatches
    in_flight = [m if schedule == "gpipe" else min(p - i, m) for i in range(p)]
    return {"schedule": schedule, "microbatches": m, "bubble_fraction": (p - 1) / (m + p - 1),
            "in_flight_microbatches": in_flight}


def plan_stages(config, num_stages: int, balance: str = "params", microbatch_size: int = 1, seq_len: int = 4096,
                dtype: torch.dtype = torch.bfloat16, schedule: str = "1f1b", microbatches: int | None = None) -> dict[str, Any]:
    """A pipeline layout for ``config``, computed on the meta device (no memory, no weights)."""
    from .dtypes import dtype_name
    from .params import build_meta_model

    if balance not in ("params", "layers"):
        raise InputError(f"balance must be 'params' or 'layers', got {balance!r}")
    model = build_meta_model(config)
    layers = list(model.model.layers.values())
    if balance == "layers":
        splits = balanced_layer_split(len(layers), num_stages)
    else:
        splits = cost_balanced_split(
            [_numel(b) for b in layers], num_stages, first_extra=_numel(model.model.embed_tokens),
            last_extra=_numel(model.model.norm) + _numel(model.lm_head) + _numel(model.mtp))
    stages = split_model(model, num_stages, splits)
    out = []
    for i, (stage, r) in enumerate(zip(stages, splits)):
        ins, outs = stage.get_pipeline_stage_metas(i == 0, microbatch_size, seq_len, dtype)
        owns = [name for name, m in (("embed_tokens", stage.model.embed_tokens), ("norm", stage.model.norm),
                                     ("lm_head", stage.lm_head), ("mtp", stage.mtp)) if m is not None]
        out.append({
            "stage": i, "layers": [r.start, r.stop - 1], "pattern": "".join(config.pattern[r.start:r.stop]),
            "owns": owns, "parameters": _numel(stage), "weight_bytes": _bytes(stage, dtype),
            # The last stage's outputs (logits, and each MTP depth's) go to the loss, not to another rank.
            "receives": [list(t.shape) for t in ins],
            "sends": [] if i == num_stages - 1 else [list(t.shape) for t in outs],
            "send_bytes": 0 if i == num_stages - 1 else sum(t.numel() * t.element_size() for t in outs),
        })
    params = [s["parameters"] for s in out]
    sched = schedule_profile(schedule, num_stages, microbatches or 2 * num_stages)
    for s, held in zip(out, sched["in_flight_microbatches"]):
        s["in_flight_microbatches"] = held
    return {"stages": out, "num_stages": num_stages, "balance": balance, "microbatch_size": microbatch_size,
            "seq_len": seq_len, "dtype": dtype_name(dtype), "total_parameters": sum(params),
            "imbalance": max(params) / (sum(params) / len(params)), "schedule": sched["schedule"],
            "microbatches": sched["microbatches"], "bubble_fraction": sched["bubble_fraction"]}


def stage_metas(model, is_first: bool, microbatch_size: int, seq_len: int,
                dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Meta tensors describing what a stage receives and sends (for torch.distributed.pipelining)."""
    config = model.config
    depths = config.num_nextn_predict_layers
    b, s, h = microbatch_size, seq_len, config.hidden_size
    hidden = torch.empty(b, s, h, dtype=dtype, device="meta")
    carried = tuple(torch.empty(b, s, h, dtype=dtype, device="meta") for _ in range(depths))
    inputs = (torch.empty(b, s, dtype=torch.long, device="meta"),) if is_first else (hidden, *carried)
    if model.lm_head is None:
        outputs = (hidden, *carried)
    else:
        # The last stage returns the logits and, when it holds the MTP head, each depth's logits
        # (NemotronHForCausalLM._stage_forward): 1 + D tensors of [B, S, vocab].
        scored = 1 + (depths if model.mtp is not None else 0)
        outputs = tuple(torch.empty(b, s, config.vocab_size, dtype=dtype, device="meta") for _ in range(scored))
    return inputs, outputs
