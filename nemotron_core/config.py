"""NemotronHConfig: every config.json form in circulation, read into one object.

We build on transformers' own ``NemotronHConfig`` so that a directory written here loads in
transformers unchanged and ``GenerationMixin`` finds the attributes it expects. On top of it we:

* accept the old block names (``mamba``, ``attention``) and the legacy ``hybrid_override_pattern`` /
  ``mamba_*`` aliases (transformers already maps most; we validate and explain failures in one line);
* write the legacy ``hybrid_override_pattern`` beside ``layers_block_type`` so older readers
  (transformers 4.x, NVIDIA's remote code) load our directories too;
* keep MTP options that transformers does not know (``mtp_use_repeated_layer``) as ordinary keys.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import NemotronHConfig as _HFNemotronHConfig

from .errors import ConfigError

# Block-type names: the newest transformers spelling is canonical in memory.
MAMBA, ATTENTION, MLP, MOE = "linear_attention", "full_attention", "mlp", "moe"
BLOCK_TYPES = (MAMBA, ATTENTION, MLP, MOE)
PATTERN_CHAR = {MAMBA: "M", ATTENTION: "*", MLP: "-", MOE: "E"}
CHAR_BLOCK = {v: k for k, v in PATTERN_CHAR.items()}
_LEGACY_NAMES = {"mamba": MAMBA, "attention": ATTENTION, "mamba2": MAMBA}


def normalize_block_types(types: Any, key: str) -> list[str]:
    """Map a layer-type list or pattern string to canonical names, or raise ConfigError."""
    if isinstance(types, str):
        bad = sorted({c for c in types if c not in CHAR_BLOCK})
        if bad:
            raise ConfigError(f"{key} has unknown block character(s) {bad}; expected M, *, - or E")
        return [CHAR_BLOCK[c] for c in types]
    if not isinstance(types, (list, tuple)):
        raise ConfigError(f"{key} must be a list of block types or a pattern string, got {type(types).__name__}")
    out = []
    for t in types:
        name = _LEGACY_NAMES.get(t, t)
        if name not in BLOCK_TYPES:
            raise ConfigError(
                f"{key} has unknown block type {t!r}; expected one of {', '.join(BLOCK_TYPES)} (or mamba, attention)"
            )
        out.append(name)
    return out


def pattern_of(types: list[str]) -> str:
    return "".join(PATTERN_CHAR[t] for t in types)


class NemotronHConfig(_HFNemotronHConfig):
    """transformers' NemotronHConfig with stricter reading and backwards-compatible writing."""

    def __post_init__(self, **kwargs: Any) -> None:
        # Normalise names before transformers validates them, so our error names the key.
        if "hybrid_override_pattern" in kwargs and self.layers_block_type is None:
            self.layers_block_type = normalize_block_types(kwargs.pop("hybrid_override_pattern"), "hybrid_override_pattern")
        else:
            kwargs.pop("hybrid_override_pattern", None)
        if self.layers_block_type is not None:
            self.layers_block_type = normalize_block_types(self.layers_block_type, "layers_block_type")
        if "mtp_hybrid_override_pattern" in kwargs and self.mtp_layers_block_type is None:
            self.mtp_layers_block_type = normalize_block_types(
                kwargs.pop("mtp_hybrid_override_pattern"), "mtp_hybrid_override_pattern"
            )
        else:
            kwargs.pop("mtp_hybrid_override_pattern", None)
        if self.mtp_layers_block_type is not None:
            self.mtp_layers_block_type = normalize_block_types(self.mtp_layers_block_type, "mtp_layers_block_type")
        kwargs.setdefault("mtp_use_repeated_layer", False)
        super().__post_init__(**kwargs)
        self.time_step_limit = tuple(float(x) for x in self.time_step_limit)
        self._check_shapes()

    def _check_shapes(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(len(self.layers_block_type) > 0, "layers_block_type is empty: the model needs at least one block")
        need(self.hidden_size > 0 and self.vocab_size > 0, "hidden_size and vocab_size must be positive")
        # Sizes a block divides by or builds from: zero or negative would crash later, not explain.
        used = set(self.all_block_types)
        for block, keys in _POSITIVE_KEYS.items():
            if block in used:
                for key in keys:
                    value = getattr(self, key)
                    need(isinstance(value, int) and value > 0, f"{key} must be a positive integer, got {value!r}")
        need(len(self.time_step_limit) == 2 and 0.0 <= self.time_step_limit[0] <= self.time_step_limit[1],
             f"time_step_limit must be [low, high] with 0 <= low <= high, got {list(self.time_step_limit)}")
        if ATTENTION in self.all_block_types:
            need(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                 f"({self.num_key_value_heads})")
        if MAMBA in self.all_block_types:
            need(self.mamba_num_heads % self.n_groups == 0,
                 f"mamba_num_heads ({self.mamba_num_heads}) must be a multiple of n_groups ({self.n_groups})")
            need(self.chunk_size > 0 and self.conv_kernel > 0, "chunk_size and conv_kernel must be positive")
        if MOE in self.all_block_types:
            need(0 < self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..n_routed_experts "
                 f"({self.n_routed_experts})")
            need(self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts ({self.n_routed_experts}) must be a multiple of n_group ({self.n_group})")
            need(1 <= self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) must be in 1..n_group")
            if self.n_group > 1:
                need(self.n_routed_experts // self.n_group >= 2, "group-limited routing needs >= 2 experts per group")
                need(self.topk_group * self.n_routed_experts // self.n_group >= self.num_experts_per_tok,
                     "topk_group groups hold fewer experts than num_experts_per_tok")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def all_block_types(self) -> list[str]:
        mtp = self.mtp_layers_block_type if self.num_nextn_predict_layers > 0 else []
        return list(self.layers_block_type) + list(mtp)

    @property
    def pattern(self) -> str:
        return pattern_of(self.layers_block_type)

    @property
    def mtp_pattern(self) -> str:
        return pattern_of(self.mtp_layers_block_type) if self.num_nextn_predict_layers > 0 else ""

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def dt_limit(self) -> tuple[float, float]:
        """The clamp applied to softplus(dt); (0, inf) means none."""
        lo, hi = self.time_step_limit
        return float(lo), float(hi)

    # ---- writing -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["layers_block_type"] = list(self.layers_block_type)
        # Older readers (transformers 4.x, NVIDIA's remote code) only know the pattern string;
        # transformers 5 ignores it when layers_block_type is present.
        out["hybrid_override_pattern"] = self.pattern
        out["num_hidden_layers"] = len(self.layers_block_type)
        if self.num_nextn_predict_layers > 0:
            out["mtp_hybrid_override_pattern"] = self.mtp_pattern
        return out


_POSITIVE_KEYS = {
    ATTENTION: ("num_attention_heads", "num_key_value_heads", "head_dim"),
    MAMBA: ("mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size"),
    MLP: ("intermediate_size",),
    MOE: ("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size", "n_group"),
}

_NUMERIC_KEYS = (
    "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
    "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel", "chunk_size",
    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
    "n_group", "topk_group", "num_nextn_predict_layers",
)


def _decode_special_floats(obj: Any) -> Any:
    # transformers writes inf as {"__float__": "Infinity"}; Python's json writes a bare Infinity.
    if isinstance(obj, dict) and set(obj) == {"__float__"}:
        return float(obj["__float__"])
    if isinstance(obj, list):
        return [_decode_special_floats(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _decode_special_floats(v) for k, v in obj.items()}
    return obj


def config_from_dict(data: dict[str, Any]) -> NemotronHConfig:
    """Build a config from a config.json dict, turning every problem into a one-line ConfigError."""
    data = _decode_special_floats(dict(data))
    mt = data.get("model_type", "nemotron_h")
    if mt != "nemotron_h":
        raise ConfigError(f"model_type is {mt!r}; this toolkit reads nemotron_h models only")
    for key in _NUMERIC_KEYS:
        v = data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"config key {key} must be an integer, got {v!r}")
    if "layers_block_type" not in data and "hybrid_override_pattern" not in data:
        raise ConfigError("config has neither layers_block_type nor hybrid_override_pattern: cannot tell the layers")
    try:
        return NemotronHConfig(**data)
    except ConfigError:
        raise
    except (TypeError, ValueError, StrictDataclassError) as e:  # transformers' strict dataclass validation
        msg = " ".join(str(e).split())
        raise ConfigError(f"invalid config: {msg[:300]}") from e


def load_config(path: str | os.PathLike) -> NemotronHConfig:
    """Read ``config.json`` from a model directory (or the file itself)."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not p.exists():
        raise ConfigError(f"{p}: no such file or directory")
    if not f.is_file():
        raise ConfigError(f"{p}: no config.json (is this a model directory?)")
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{f}: expected a JSON object")
    return config_from_dict(data)


def set_config_value(data: dict[str, Any], key: str, raw: str) -> None:
    """Apply a ``--set key=value`` override, parsing ``raw`` to the type the key already has."""
    known = set(data) | set(NemotronHConfig().to_dict()) | {"hybrid_override_pattern", "mtp_hybrid_override_pattern"}
    if key not in known:
        raise ConfigError(f"--set {key}: unknown config key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # bare strings such as a pattern: M*E-
    current = data.get(key, NemotronHConfig().to_dict().get(key))
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ConfigError(f"--set {key}={raw}: expected true or false")
    if isinstance(current, int) and not isinstance(current, bool) and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"--set {key}={raw}: expected an integer")
    if isinstance(current, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"--set {key}={raw}: expected a number")
    if isinstance(current, (list, str)) and key.endswith(("pattern", "block_type")) and not isinstance(value, (list, str)):
        raise ConfigError(f"--set {key}={raw}: expected a pattern string or a list")
    if key == "hybrid_override_pattern":
        data.pop("layers_block_type", None)
        data.pop("num_hidden_layers", None)
    if key == "mtp_hybrid_override_pattern":
        data.pop("mtp_layers_block_type", None)
    if key == "layers_block_type":
        data.pop("hybrid_override_pattern", None)
        data.pop("num_hidden_layers", None)
    data[key] = value
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"--set {key}: NaN is not a valid value")
