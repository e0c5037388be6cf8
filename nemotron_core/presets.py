"""Named model shapes for ``nemotron init``. Pure data: importing this never imports torch.

``tiny`` and ``tiny-mtp`` hold every block type and run in seconds on a CPU; the others are the
published shapes (for planning with ``--no-weights``, or random weights on a big machine).
Dims of the tiny presets are multiples of 8 so the grouped-GEMM expert path runs in fp32 and bf16.

Each preset spells its layers once, as ``hybrid_override_pattern``, and never carries
``num_hidden_layers`` or ``layers_block_type``: ``--set hybrid_override_pattern=...`` can then change
the depth alone, and a ``num_hidden_layers`` in the built config can only be the user's own (checked
against the pattern). tests/test_config.py holds every preset to this.
"""
from __future__ import annotations

from typing import Any

_TINY: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "hybrid_override_pattern": "M*EM-M*E",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "n_groups": 2,
    "ssm_state_size": 16,
    "conv_kernel": 4,
    "chunk_size": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 64,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "max_position_embeddings": 4096,
}

_NANO_30B_A3B: dict[str, Any] = {
    "vocab_size": 131072, "hidden_size": 2688,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "attention_bias": False,
    "intermediate_size": 1856, "mamba_num_heads": 64, "mamba_head_dim": 64, "n_groups": 8,
    "ssm_state_size": 128, "conv_kernel": 4, "chunk_size": 128, "use_conv_bias": True,
    "n_routed_experts": 128, "num_experts_per_tok": 6, "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "norm_topk_prob": True, "routed_scaling_factor": 2.5, "max_position_embeddings": 262144,
    "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 0.0001,
    "rescale_prenorm_residual": True, "layer_norm_epsilon": 1e-5,
}

# Nemotron-H dense base models (Mamba2 + attention + relu2 MLP), published 8K-context shapes.
_H_PATTERN_52 = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
_NEMOTRON_H_4B: dict[str, Any] = {
    "vocab_size": 131072, "hidden_size": 3072, "hybrid_override_pattern": _H_PATTERN_52,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288,
    "mamba_num_heads": 112, "mamba_head_dim": 64, "n_groups": 8, "ssm_state_size": 128,
    "conv_kernel": 4, "chunk_size": 128, "max_position_embeddings": 8192,
}
_NEMOTRON_H_8B: dict[str, Any] = {
    **_NEMOTRON_H_4B, "hidden_size": 4096, "intermediate_size": 21504, "mamba_num_heads": 128,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    "tiny-mtp": {**_TINY, "num_nextn_predict_layers": 2, "mtp_hybrid_override_pattern": "*E"},
    "nemotron-3-nano-30b-a3b": _NANO_30B_A3B,
    "nemotron-h-4b": _NEMOTRON_H_4B,
    "nemotron-h-8b": _NEMOTRON_H_8B,
}

DESCRIPTIONS: dict[str, str] = {
    "tiny": "every block type (M * E -), ~1 MB; the built-in default for demos and tests",
    "tiny-mtp": "tiny plus a 2-depth multi-token-prediction head (*E)",
    "nemotron-3-nano-30b-a3b": "NVIDIA Nemotron 3 Nano 30B-A3B (hybrid Mamba2/attention/MoE)",
    "nemotron-h-4b": "Nemotron-H 4B base (dense hybrid Mamba2/attention/MLP)",
    "nemotron-h-8b": "Nemotron-H 8B base (dense hybrid Mamba2/attention/MLP)",
}

COMMON: dict[str, Any] = {
    "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"],
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_config_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        from .errors import ConfigError

        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} (see nemotron init --list)")
    return {**COMMON, **PRESETS[name]}
