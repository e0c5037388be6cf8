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


def stage_module_names(model, num_stages: int, layers_prefix: str = "model.") -> list[list[str]]:
    """Fully qualified module names each stage owns (the model's hook adds the MTP head last)."""
    names = []
    splits = balanced_layer_split(len(model.model.layers), num_stages)
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


def split_model(model, num_stages: int) -> list[Any]:
    """Split ``model`` into ``num_stages`` stage models (deep copies; build on meta for real sizes)."""
    import copy

    names = stage_module_names(model, num_stages)
    return [trim_to_stage(copy.deepcopy(model), stage) for stage in names]


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
        outputs = (torch.empty(b, s, config.vocab_size, dtype=dtype, device="meta"),)
    return inputs, outputs
