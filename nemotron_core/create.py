"""Create a model directory from a preset: config, generation config, tokenizer, random weights."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import NemotronHConfig, config_from_dict, set_config_value
from .dtypes import cast_model, dtype_name, parse_dtype
from .errors import ConfigError, check_seed
from .io_utils import atomic_output_dir, human_bytes, parse_size
from .params import count_parameters
from .presets import preset_config_dict


def build_config(preset: str, overrides: list[str] | None = None) -> NemotronHConfig:
    """A preset's config with ``key=value`` overrides applied and the result validated."""
    data = preset_config_dict(preset)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        set_config_value(data, key.strip(), raw.strip())
    return config_from_dict(data)


def random_model(config: NemotronHConfig, dtype: torch.dtype, seed: int, device: str | torch.device = "cpu"):
    """A model with freshly initialised weights: built on meta, materialised once in ``dtype``."""
    from .modeling.model import NemotronHForCausalLM

    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
    # On a CPU, draw in fp32 so one seed gives the same values whatever the dtype; on an accelerator,
    # draw in the target dtype so a real-size model never needs twice its memory.
    draw = torch.float32 if torch.device(device).type == "cpu" else dtype
    cast_model(model, draw)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.initialize_weights(dtype=draw)
    return cast_model(model, dtype)


def summarize(config: NemotronHConfig) -> dict[str, Any]:
    counts = count_parameters(config)
    return {
        "pattern": config.pattern,
        "layers": len(config.layers_block_type),
        "mtp_depths": config.num_nextn_predict_layers,
        "mtp_pattern": config.mtp_pattern or None,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "parameters": {"total": counts["total"], "active": counts["active"]},
    }


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def create_model_dir(out_dir: str | os.PathLike, preset: str = "tiny", overrides: list[str] | None = None,
                     dtype: str | torch.dtype = "bf16", seed: int = 0, weights: bool = True,
                     max_shard_size: str | int = "5GB", force: bool = False) -> dict[str, Any]:
    """Write a complete Hugging Face-layout model directory atomically; returns a summary."""
    from .checkpoint import save_pretrained
    from .tokenizer import save_tokenizer

    check_seed(seed, "--seed")
    config = build_config(preset, overrides)
    torch_dtype = parse_dtype(dtype)
    parse_size(max_shard_size)  # a bad size fails now, not after the weights are drawn
    with atomic_output_dir(out_dir, force=force) as tmp:
        tok = save_tokenizer(tmp, config.vocab_size)
        gen = {"bos_token_id": tok["bos_token_id"], "eos_token_id": tok["chat_eos_token_ids"],
               "pad_token_id": tok["pad_token_id"]}
        if weights:
            model = random_model(config, torch_dtype, seed)
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig(**gen)
            save_pretrained(model, tmp, max_shard_size=max_shard_size, dtype=torch_dtype)
            del model
        else:
            config.architectures = ["NemotronHForCausalLM"]
            config.dtype = dtype_name(torch_dtype)
            config.save_pretrained(str(tmp))
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        size = dir_size(tmp)
    summary = summarize(config)
    summary.update({
        "path": str(Path(out_dir)), "preset": preset, "dtype": dtype_name(torch_dtype), "seed": seed,
        "weights": weights, "size_bytes": size, "size": human_bytes(size), "tokenizer_vocab": tok["vocab_size"],
    })
    return summary
