"""NemotronHConfig: every config.json form in circulation, read into one object.

We build on transformers' own ``NemotronHConfig`` so that a directory written here loads in
transformers unchanged and ``GenerationMixin`` finds the attributes it expects. On top of it we:

* accept the old block names (``mamba``, ``attention``) and the legacy ``hybrid_override_pattern`` /
  ``mamba_*`` aliases (transformers already maps most; we validate and explain failures in one line);
* refuse what transformers lets pass silently: ``layers_block_type``, ``hybrid_override_pattern`` and
  ``num_hidden_layers`` that disagree (any subset may be present), and values out of their range;
* write the legacy ``hybrid_override_pattern`` beside ``layers_block_type`` so older readers
  (transformers 4.x, NVIDIA's remote code) load our directories too;
* keep MTP options that transformers does not know (``mtp_use_repeated_layer``) as ordinary keys.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from pathlib import Path
from typing import Any, Callable, NamedTuple

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
        # Resolve the layer lists ourselves before transformers sees them: it silently prefers
        # layers_block_type over hybrid_override_pattern and ignores num_hidden_layers, so a file that
        # contradicts itself would load as something its author did not write.
        self.layers_block_type = _resolve_layer_list(
            self.layers_block_type, kwargs.pop("hybrid_override_pattern", None),
            "layers_block_type", "hybrid_override_pattern")
        self.mtp_layers_block_type = _resolve_layer_list(
            self.mtp_layers_block_type, kwargs.pop("mtp_hybrid_override_pattern", None),
            "mtp_layers_block_type", "mtp_hybrid_override_pattern")
        # Popped so transformers does not log its own mismatch warning; checked once the list is final.
        num_hidden_layers = kwargs.pop("num_hidden_layers", None)
        _check_token_ids(self)  # before transformers, which only warns about an id outside the vocabulary
        kwargs.setdefault("mtp_use_repeated_layer", False)
        super().__post_init__(**kwargs)
        self.time_step_limit = tuple(float(x) for x in self.time_step_limit)
        _check_layer_count(num_hidden_layers, self.layers_block_type)
        self._check_shapes()

    def _check_shapes(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(len(self.layers_block_type) > 0, "layers_block_type is empty: the model needs at least one block")
        if self.num_nextn_predict_layers > 0:
            need(len(self.mtp_layers_block_type) > 0,
                 f"mtp_layers_block_type is empty but num_nextn_predict_layers is {self.num_nextn_predict_layers}")
        # Bounds are checked only for the blocks the model has: a dense model's unused MoE sizes do no harm.
        used = set(self.all_block_types)
        for bound in _BOUNDS:
            if bound.block is None or bound.block in used:
                value = getattr(self, bound.key)
                need(bound.ok(value), f"{bound.key} must be {bound.must}, got {value!r}")
        need(len(self.time_step_limit) == 2 and 0.0 <= self.time_step_limit[0] <= self.time_step_limit[1],
             f"time_step_limit must be [low, high] with 0 <= low <= high, got {list(self.time_step_limit)}")
        if ATTENTION in used:
            need(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                 f"({self.num_key_value_heads})")
        if MAMBA in used:
            need(self.mamba_num_heads % self.n_groups == 0,
                 f"mamba_num_heads ({self.mamba_num_heads}) must be a multiple of n_groups ({self.n_groups})")
            # dt is drawn log-uniformly between the two at init.
            need(self.time_step_min <= self.time_step_max,
                 f"time_step_min ({self.time_step_min}) must be <= time_step_max ({self.time_step_max})")
        if MOE in used:
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


def _resolve_layer_list(listed: Any, pattern: Any, list_key: str, pattern_key: str) -> list[str] | None:
    """One layer list from its two spellings (either may be absent); both present must agree.

    transformers keeps the list and drops the pattern without a word; a file whose two spellings
    differ is ambiguous, so we refuse it rather than guess which one its author meant.
    """
    types = normalize_block_types(listed, list_key) if listed is not None else None
    if pattern is None:
        return types
    from_pattern = normalize_block_types(pattern, pattern_key)
    if types is None or types == from_pattern:
        return from_pattern
    if len(types) != len(from_pattern):
        raise ConfigError(f"{list_key} has {len(types)} layers but {pattern_key} has {len(from_pattern)}: "
                          f"they must describe the same layers")
    i = next(i for i, (a, b) in enumerate(zip(types, from_pattern)) if a != b)
    raise ConfigError(f"{list_key} and {pattern_key} disagree at layer {i} ({types[i]} vs {from_pattern[i]}): "
                      f"they must describe the same layers")


def _check_token_ids(config: Any) -> None:
    """bos/eos/pad token ids (an int, a list of ints, or null) must name tokens of the vocabulary."""
    vocab = getattr(config, "vocab_size", None)
    if not (isinstance(vocab, int) and vocab > 0):
        return  # vocab_size itself is checked (and named) with the other sizes
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab):
                raise ConfigError(f"{key} {i!r} is outside the vocabulary [0, {vocab})")


def _check_layer_count(count: Any, types: list[str]) -> None:
    """num_hidden_layers only restates the layer count (legacy files carry it); it must match the list."""
    if count is None:
        return
    if isinstance(count, bool) or not isinstance(count, int):
        raise ConfigError(f"num_hidden_layers must be an integer, got {count!r}")
    if count <= 0:
        raise ConfigError(f"num_hidden_layers must be a positive integer, got {count}")
    if count != len(types):
        pattern = pattern_of(types)
        shown = pattern if len(pattern) <= 64 else pattern[:61] + "..."  # keep the error one short line
        raise ConfigError(f"num_hidden_layers is {count} but the layer pattern {shown!r} has {len(types)} layers: "
                          f"the pattern sets the depth, so make hybrid_override_pattern (or layers_block_type) "
                          f"{count} layers long, or drop num_hidden_layers")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


class _Bound(NamedTuple):
    key: str
    block: str | None  # checked only when the model has this block type; None: always
    ok: Callable[[Any], bool]
    must: str  # completes "KEY must be ..."


_POSITIVE_INT = "a positive integer"
_BOUNDS: tuple[_Bound, ...] = (
    # Sizes a block divides by or builds from: zero or negative would crash later, not explain.
    *(_Bound(k, None, _positive_int, _POSITIVE_INT) for k in ("vocab_size", "hidden_size", "max_position_embeddings")),
    _Bound("num_nextn_predict_layers", None, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    _Bound("layer_norm_epsilon", None, lambda v: _is_number(v) and v > 0, "a positive finite number"),
    # A standard deviation for torch's normal_: negative is an error there, deep inside weight init.
    _Bound("initializer_range", None, lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    _Bound("hidden_dropout", None, lambda v: _is_number(v) and 0 <= v < 1, "a probability in [0, 1)"),
    _Bound("attention_dropout", ATTENTION, lambda v: _is_number(v) and 0 <= v < 1, "a probability in [0, 1)"),
    *(_Bound(k, ATTENTION, _positive_int, _POSITIVE_INT)
      for k in ("num_attention_heads", "num_key_value_heads", "head_dim")),
    *(_Bound(k, MAMBA, _positive_int, _POSITIVE_INT)
      for k in ("mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel", "chunk_size",
                "expand")),
    # dt is drawn log-uniformly in [time_step_min, time_step_max]: both need a logarithm.
    *(_Bound(k, MAMBA, lambda v: _is_number(v) and v > 0, "a positive finite number")
      for k in ("time_step_min", "time_step_max")),
    _Bound("time_step_floor", MAMBA, lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    _Bound("intermediate_size", MLP, _positive_int, _POSITIVE_INT),
    *(_Bound(k, MOE, _positive_int, _POSITIVE_INT)
      for k in ("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size", "n_group")),
    _Bound("moe_latent_size", MOE, lambda v: v is None or _positive_int(v), "null or a positive integer"),
    _Bound("routed_scaling_factor", MOE, lambda v: _is_number(v) and v > 0, "a positive finite number"),
)

_NUMERIC_KEYS = (
    "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
    "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel", "chunk_size",
    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
    "n_group", "topk_group", "num_nextn_predict_layers", "max_position_embeddings", "expand",
)


def _float_only_fields() -> frozenset[str]:
    """Fields transformers types as plain ``float``: its strict check refuses an int there."""
    names = set()
    for f in dataclasses.fields(_HFNemotronHConfig):
        args = typing.get_args(f.type) or (f.type,)
        if float in args and int not in args:
            names.add(f.name)
    return frozenset(names)


_FLOAT_ONLY_FIELDS = _float_only_fields()
# Legacy spellings transformers maps onto float fields (it reads them after its type check).
_FLOAT_ALIASES = frozenset({"mamba_dt_min", "mamba_dt_max", "mamba_dt_init_floor"})
_FLOAT_LIST_KEYS = frozenset({"time_step_limit", "mamba_dt_limit"})


def _ints_to_floats(data: dict[str, Any]) -> dict[str, Any]:
    """JSON and ``--set`` write 1 for 1.0; an int is a valid float, so convert it (never a bool)."""
    def as_float(v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    out = dict(data)
    for key in (_FLOAT_ONLY_FIELDS | _FLOAT_ALIASES) & set(out):
        out[key] = as_float(out[key])
    for key in _FLOAT_LIST_KEYS & set(out):
        if isinstance(out[key], (list, tuple)):
            out[key] = [as_float(v) for v in out[key]]
    return out


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
    if data.get("layers_block_type") is None and data.get("hybrid_override_pattern") is None:
        raise ConfigError("config has neither layers_block_type nor hybrid_override_pattern: cannot tell the layers")
    data = _ints_to_floats(data)
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


# The two spellings of each layer list name one setting.
_LAYER_SPELLINGS = {
    "hybrid_override_pattern": "layers_block_type", "layers_block_type": "hybrid_override_pattern",
    "mtp_hybrid_override_pattern": "mtp_layers_block_type", "mtp_layers_block_type": "mtp_hybrid_override_pattern",
}


def set_config_value(data: dict[str, Any], key: str, raw: str) -> None:
    """Apply a ``--set key=value`` override, parsing ``raw`` to the type the key already has.

    Setting one spelling of a layer list replaces the other (as a repeated ``--set`` would).
    ``num_hidden_layers`` is left alone: presets never carry it, so it is only here when the user set
    it, and then it must match the final list; the check happens when the config is built, so the
    order of the ``--set`` options does not matter.
    """
    defaults = NemotronHConfig().to_dict()
    known = set(data) | set(defaults) | {"hybrid_override_pattern", "mtp_hybrid_override_pattern"}
    if key not in known:
        raise ConfigError(f"--set {key}: unknown config key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # bare strings such as a pattern: M*E-
    current = data.get(key, defaults.get(key))
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ConfigError(f"--set {key}={raw}: expected true or false")
    if isinstance(current, int) and not isinstance(current, bool) and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"--set {key}={raw}: expected an integer")
    if isinstance(current, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"--set {key}={raw}: expected a number")
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"--set {key}: NaN is not a valid value")
    if key in _LAYER_SPELLINGS:
        if not isinstance(value, (list, str)):
            raise ConfigError(f"--set {key}={raw}: expected a pattern string or a list")
        if key.endswith("block_type") and isinstance(value, str):
            value = normalize_block_types(value, key)  # the list field holds names; accept the short form
        data.pop(_LAYER_SPELLINGS[key], None)
    data[key] = value
