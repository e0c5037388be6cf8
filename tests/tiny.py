"""Tiny Nemotron-H models for fast CPU tests (plain helpers: ``import tiny``).

Every dimension is a multiple of 8 so the grouped-GEMM expert path runs in fp32 and bf16.

``time_step_min`` defaults to 1e-9: transformers 5.x clamps dt at ``time_step_min`` in its prefill
(chunked-scan) path but not in decode, while nemotron_core follows the checkpoint's
``time_step_limit`` (default (0, inf), i.e. no clamp) as FACTS.md says. A tiny ``time_step_min``
makes transformers' clamp inert so parity tests compare the math; ``test_parity`` has a separate test
for the clamp itself.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open

PATTERN_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}

TINY: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "mamba_num_heads": 4,
    "mamba_head_dim": 8,
    "n_groups": 2,
    "ssm_state_size": 8,
    "conv_kernel": 4,
    "chunk_size": 8,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 24,
    "intermediate_size": 48,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "max_position_embeddings": 256,
    "time_step_min": 1e-9,
    "layers_block_type": [PATTERN_TYPES[c] for c in "M*-E"],
}


def types_of(pattern: str) -> list[str]:
    return [PATTERN_TYPES[c] for c in pattern]


def hf_config(**overrides: Any) -> transformers.NemotronHConfig:
    """A tiny transformers config. ``pattern="M*E"`` is a shorthand for ``layers_block_type``."""
    data = dict(TINY)
    if "pattern" in overrides:
        data["layers_block_type"] = types_of(overrides.pop("pattern"))
    data.update(overrides)
    return transformers.NemotronHConfig(**data)


def our_config(**overrides: Any):
    """The same tiny config read through nemotron_core's config reader."""
    from nemotron_core.config import config_from_dict

    return config_from_dict(hf_config(**overrides).to_dict())


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Add ``scale * N(0, 1)`` to every floating parameter and to the router correction bias.

    The default init leaves norms at 1, D at 1, the correction bias at 0 and weights tiny; noise
    makes every tensor matter, so a swapped, missing or mis-read tensor shows in the logits.
    Iterates in sorted-name order so the draw does not depend on module registration order."""
    g = torch.Generator().manual_seed(seed)
    tensors = dict(model.named_parameters())
    tensors.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point():
            t.add_((torch.randn(t.shape, generator=g) * scale).to(t.dtype))
    return model


def hf_model(seed: int = 0, perturb: bool = True, **overrides: Any) -> transformers.NemotronHForCausalLM:
    torch.manual_seed(seed)
    model = transformers.NemotronHForCausalLM(hf_config(**overrides)).eval()
    return perturb_(model, seed + 1000) if perturb else model


def our_model(seed: int = 0, perturb: bool = True, dtype: torch.dtype = torch.float32, backend=None,
              **overrides: Any):
    from nemotron_core.modeling.model import NemotronHForCausalLM

    model = NemotronHForCausalLM.from_config(our_config(**overrides), backend=backend)
    torch.manual_seed(seed)
    model.initialize_weights(dtype=torch.float32)
    if perturb:
        perturb_(model, seed + 1000)
    if dtype != torch.float32:
        from nemotron_core.dtypes import cast_model

        cast_model(model, dtype)
    return model.eval()


def left_padded_mask(batch: int, seq: int, pad: int) -> torch.Tensor:
    """All ones except the first ``pad`` positions of the last row."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, :pad] = 0
    return mask


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|a|`` (a is the reference)."""
    return float((a.double() - b.double()).abs().max() / a.double().abs().max())


def safetensors_layout(model_dir: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{tensor name: (shape, dtype)}`` over all safetensors files of a directory (index or single file)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(d.glob("*.safetensors"))]
    assert files, f"no safetensors in {d}"
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in files:
        with safe_open(str(d / name), framework="pt") as f:
            for key in f.keys():
                assert key not in out, f"tensor {key} stored twice"
                sl = f.get_slice(key)
                out[key] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def softplus_inv(x: float) -> float:
    return x + math.log(-math.expm1(-x))


def _edited_copy(model_dir: str | Path, dest: Path, edit) -> Path:
    """A copy of a model directory with ``edit(name, tensor)`` applied in place to every stored tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, dest)
    for shard in dest.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            edit(name, t)
        save_file(tensors, shard, metadata={"format": "pt"})
    return dest


def nan_lm_head_copy(model_dir: str | Path, dest: Path) -> Path:
    """A copy of a model directory whose LM head is all NaN (non-finite logits, loadable weights)."""
    def edit(name: str, t: torch.Tensor) -> None:
        if name == "lm_head.weight":
            t.fill_(float("nan"))

    return _edited_copy(model_dir, dest, edit)


def nan_embeddings_copy(model_dir: str | Path, dest: Path, keep: list[int]) -> Path:
    """A copy of a model directory whose input embeddings are NaN for every token id but ``keep``: a
    prompt of those ids gives finite logits, and decoding breaks at the first other token fed back."""
    def edit(name: str, t: torch.Tensor) -> None:
        if name.endswith(("embeddings.weight", "embed_tokens.weight")):
            kept = t[keep].clone()
            t.fill_(float("nan"))
            t[keep] = kept

    return _edited_copy(model_dir, dest, edit)
