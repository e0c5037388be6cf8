"""LoRA: adapter layers, PEFT-format load/save, merge.

An adapter directory is what PEFT's ``save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors`` holding ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]`` for every adapted ``nn.Linear``. ``<module>`` is the module's path
in transformers' model, which for NemotronH (transformers 5) is our in-memory path
(``model.layers.N.mixer.q_proj``, ``lm_head``); the checkpoint-layout path of older remote-code
models (``backbone.layers.N...``) is accepted too. The forward of an adapted layer is
``base(x) + lora_B(lora_A(dropout(x))) * scaling`` with ``scaling = alpha / r`` (``alpha / sqrt(r)``
under rsLoRA), as in PEFT. Only safetensors are read; ``adapter_model.bin`` is refused (never unpickled).

Not supported (refused with one line): DoRA, LoRA biases, ``modules_to_save``, per-module rank or
alpha patterns, ``layers_to_transform``, ``target_parameters`` and LoRA on the routed experts (they are
stacked ``[E, out, in]`` parameters, not ``nn.Linear`` modules). The MTP head, which transformers'
model lacks, is never adapted, so adapters made here load onto transformers' model with PEFT.

PEFT itself refuses to target ``out_proj`` (and ``conv1d``) in Mamba models (its CUDA fast path
bypasses the module); our Mamba mixer always calls ``out_proj`` as a module, so such adapters load and
run here, but one saved with an ``out_proj`` target will not load in PEFT.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, InputError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
_WRAPPED = "._checkpoint_wrapped_module"
_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")
# adapter_config.json options that change what the adapter computes and that we do not implement:
# refused when set to anything but their default (an empty/false/null value).
_UNSUPPORTED = {
    "lora_bias": "LoRA biases (lora_bias)",
    "layers_to_transform": "layers_to_transform",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "target_parameters": "LoRA on parameters (target_parameters, e.g. routed experts)",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "use_bdlora",
    "megatron_config": "megatron_config",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "arrow_config": "arrow_config",
    "kasa_config": "kasa_config",
    "monteclora_config": "monteclora_config",
    "velora_config": "velora_config",
}


# ---- config ---------------------------------------------------------------------------------------
@dataclass
class LoraConfig:
    """The parts of PEFT's ``LoraConfig`` that define a plain LoRA adapter.

    ``target_modules``: a list of module-name suffixes (``"q_proj"``, ``"mixer.in_proj"``) or full
    names, or one regular expression matched against the whole module name, or ``"all-linear"``
    (every ``nn.Linear`` but ``lm_head``). ``exclude_modules`` follows the same rules."""

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str = field(default_factory=list)
    lora_dropout: float = 0.0
    use_rslora: bool = False
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    task_type: str | None = "CAUSAL_LM"
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise InputError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise InputError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0 <= self.lora_dropout < 1:
            raise InputError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None and name == "exclude_modules":
                continue
            if isinstance(value, str):
                _compile(value, name)
            elif not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
                raise InputError(f"{name} must be a list of module names or a regular expression, got {value!r}")
        if not self.target_modules:
            raise InputError("target_modules is empty: name the modules to adapt (e.g. [\"q_proj\", \"v_proj\"])")
        if self.bias != "none":
            raise InputError(f"bias={self.bias!r} is not supported (only \"none\": LoRA adapters without trained biases)")
        if self.fan_in_fan_out:
            raise InputError("fan_in_fan_out=true is not supported (it is for GPT-2 style Conv1D layers)")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = CONFIG_NAME) -> "LoraConfig":
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a JSON object")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise InputError(f"{where}: peft_type {peft_type!r} is not supported (only LORA adapters)")
        if data.get("use_dora"):
            raise InputError(f"{where}: DoRA adapters are not supported (use_dora is true)")
        if data.get("modules_to_save"):
            raise InputError(f"{where}: modules_to_save ({', '.join(map(str, data['modules_to_save']))}) is not "
                             "supported: the adapter carries whole trained modules, not only LoRA weights")
        for key, what in _UNSUPPORTED.items():
            if data.get(key) not in (None, False, {}, [], ""):
                raise InputError(f"{where}: sets {what}, which is not supported")
        if data.get("target_modules") is None:
            raise InputError(f"{where}: target_modules is missing")
        kwargs = {k: data[k] for k in ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora",
                                        "exclude_modules", "bias", "fan_in_fan_out", "task_type",
                                        "base_model_name_or_path") if k in data and data[k] is not None}
        kwargs.setdefault("lora_alpha", 8)
        try:
            return cls(**kwargs)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "LoraConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path.parent}: no {path.name} (not a PEFT LoRA adapter directory)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read ({e})") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        """``adapter_config.json`` content that PEFT's ``LoraConfig`` reads."""
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "use_rslora": self.use_rslora,
            "bias": self.bias,
            "fan_in_fan_out": self.fan_in_fan_out,
            "modules_to_save": None,
            "use_dora": False,
            "lora_bias": False,
            "init_lora_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
        }


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise InputError(f"{what} {pattern!r} is not a valid regular expression ({e})") from None


# ---- the layer ------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """``base(x) + lora_B(lora_A(dropout(x))) * scaling`` around an ``nn.Linear``.

    ``lora_A``/``lora_B`` live in ``dtype`` (default fp32, as PEFT keeps adapters of a bf16 model);
    the input is cast to it and the sum back to the base output's dtype. ``merge()`` folds the update
    into ``base.weight`` (computed in fp32), after which the forward is the base layer alone."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise InputError(f"LoRA wraps nn.Linear modules, got {type(base).__name__}")
        self.base = base
        self.r = r
        self.scaling = float(scaling)
        self.adapter_name = adapter_name
        factory = {"device": base.weight.device, "dtype": dtype or torch.float32}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        if not base.weight.is_meta:
            self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A Kaiming-uniform, B zero (the adapter starts as the identity)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shaped like ``base.weight``."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scaling
        return (out + update).to(out.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


# ---- finding targets ------------------------------------------------------------------------------
def clean_name(name: str) -> str:
    """A module name without activation-checkpoint wrapper segments (the name transformers uses)."""
    return name.replace(_WRAPPED, "")


def _matches(spec: list[str] | str, name: str) -> bool:
    """PEFT's rule: a regex must match the whole name; a list entry is the full name or a dotted suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _modules(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{clean name: (module, real name)}`` for the modules a target may name: not the root, not inside
    a LoRA layer, not in the MTP head."""
    found: dict[str, tuple[nn.Module, str]] = {}
    lora_prefixes: list[str] = []
    for real, module in model.named_modules():
        if not real or any(real.startswith(p) for p in lora_prefixes):
            continue
        name = clean_name(real)
        if name == "mtp" or name.startswith("mtp."):
            continue
        if isinstance(module, LoRALinear):
            lora_prefixes.append(real + ".")
        found[name] = (module, real)
    return found


def _linear_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """The adaptable Linear modules (plain or already wrapped) of ``_modules``."""
    return {n: v for n, v in _modules(model).items() if isinstance(v[0], (nn.Linear, LoRALinear))}


def _expert_names(model: nn.Module) -> list[str]:
    """Routed-expert weights under the names a target could use: the stacked parameter
    (``...mixer.experts.up_proj``) and the per-expert modules of the checkpoint layout
    (``...mixer.experts.0.up_proj``)."""
    names = []
    for real, p in model.named_parameters():
        name = clean_name(real)
        if re.search(r"\.mixer\.experts\.(up_proj|down_proj)$", name) and p.dim() == 3:
            names.append(name)
            prefix, proj = name.rsplit(".", 1)
            names.extend(f"{prefix}.{e}.{proj}" for e in range(p.shape[0]))
    return names


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Clean names of the Linear modules ``config`` targets, in module order (PEFT's matching rules;
    ``exclude_modules`` wins).

    Raises InputError when a target names a module that is not an ``nn.Linear``, matches only
    routed-expert weights, or when nothing matches at all."""
    modules = _modules(model)
    spec, exclude = config.target_modules, config.exclude_modules
    names = [n for n in modules if not (exclude and _matches(exclude, n))]
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        chosen = [n for n in names if isinstance(modules[n][0], (nn.Linear, LoRALinear)) and n != "lm_head"]
    else:
        chosen = []
        for n in names:
            if _matches(spec, n):
                if not isinstance(modules[n][0], (nn.Linear, LoRALinear)):
                    raise InputError(f"target_modules {spec!r} matches {n} ({type(modules[n][0]).__name__}); "
                                     "LoRA here adapts nn.Linear modules only")
                chosen.append(n)
        entries = [spec] if isinstance(spec, str) else [[t] for t in spec]
        experts = _expert_names(model)
        for entry in entries:
            if not any(_matches(entry, n) for n in chosen):
                hit = next((n for n in experts if _matches(entry, n)), None)
                if hit is not None:
                    shown = entry if isinstance(entry, str) else entry[0]
                    raise InputError(f"target_modules entry {shown!r} matches only routed-expert weights ({hit}); "
                                     "they are stacked [experts, out, in] parameters, which LoRA cannot wrap")
    if not chosen:
        raise InputError(f"target_modules {spec!r} matches no nn.Linear module of the model")
    return chosen


def _set_module(model: nn.Module, real_name: str, module: nn.Module) -> None:
    parent_name, _, child = real_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def rank_limit(model: nn.Module, names: list[str]) -> tuple[int, str]:
    """The largest useful LoRA rank over the Linear modules ``names`` (clean names) and the module that
    sets it: the smallest ``min(in_features, out_features)``. A larger r cannot raise the rank of the
    update B @ A; it only adds r x (in + out) parameters per module (memory, optimizer state, disk)."""
    linears = _linear_modules(model)
    limit, narrowest = 0, ""
    for name in names:  # in module order, so a tie names the first such module
        width = min(linears[name][0].in_features, linears[name][0].out_features)
        if not narrowest or width < limit:
            limit, narrowest = width, name
    return limit, narrowest


def apply_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
               dtype: torch.dtype | None = None, targets: list[str] | None = None) -> list[str]:
    """Wrap the Linear modules ``config`` targets in ``LoRALinear`` (fresh PEFT init: B = 0, so the
    model's output is unchanged). Returns the wrapped modules' names. ``targets`` (clean names)
    overrides the matching. One adapter per module: wrapping a wrapped module is an InputError."""
    linears = _linear_modules(model)
    names = find_targets(model, config) if targets is None else list(targets)
    for name in names:
        if name not in linears:
            raise InputError(f"{name} is not an nn.Linear module of the model")
        if isinstance(linears[name][0], LoRALinear):
            raise InputError(f"{name} already has a LoRA adapter")
    limit, narrowest = rank_limit(model, names)
    if names and config.r > limit:  # checked before any adapter is allocated (an absurd r would take GBs)
        raise InputError(f"r={config.r} exceeds the rank {narrowest} can use (min(in_features, out_features) "
                         f"= {limit}); use r <= {limit}")
    for name in names:
        base, real = linears[name]
        _set_module(model, real, LoRALinear(base, config.r, config.scaling, config.lora_dropout, dtype, adapter_name))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """``{clean name: layer}`` for every LoRA layer of the model."""
    return {clean_name(n): m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the LoRA matrices; returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for m in lora_modules(model).values():
        for p in (m.lora_A.weight, m.lora_B.weight):
            p.requires_grad_(True)
            params.append(p)
    return params


def _put_bases_back(model: nn.Module, fold: bool) -> nn.Module:
    for real, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge() if fold else module.unmerge()
            _set_module(model, real, module.base)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight and put the plain ``nn.Linear`` back."""
    return _put_bases_back(model, fold=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every LoRA layer (unmerging first if merged), restoring the base model."""
    return _put_bases_back(model, fold=False)


# ---- reading and writing adapter directories ------------------------------------------------------
def _module_of_key(key: str) -> tuple[str, str]:
    """``base_model.model.<path>.lora_X.weight`` -> (our module name, "lora_A"|"lora_B")."""
    m = _KEY.match(key)
    if m is None:
        raise CheckpointError(f"tensor {key} is not a LoRA weight (expected base_model.model.<module>.lora_A.weight "
                              "or .lora_B.weight)")
    path = m[1]
    if path.startswith("backbone."):  # checkpoint layout (transformers 4 remote-code models)
        from .checkpoint import hf_to_internal

        name, expert = hf_to_internal(path + ".weight")
        if expert is None:
            path = name[: -len(".weight")]
        else:  # a per-expert module: name it as _expert_names does
            prefix, proj = name.rsplit(".", 1)
            path = f"{prefix}.{expert}.{proj}"
    return clean_name(path), m[2]


def _read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        if (adapter_dir / "adapter_model.bin").exists():
            raise InputError(f"{adapter_dir}: only a pickled adapter_model.bin found; this toolkit loads safetensors "
                             "only (it never unpickles files). Re-save it with PEFT's save_pretrained "
                             "(safe_serialization=True)")
        raise CheckpointError(f"{adapter_dir}: no {WEIGHTS_NAME} found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({' '.join(str(e).split())})") from None


def _plan(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Check the adapter against the model before anything changes: ``{module: {"lora_A": t, "lora_B": t}}``.

    Every key must land on a targeted Linear with the right shape, and every targeted Linear must get
    both matrices; otherwise a one-line CheckpointError names the tensor."""
    linears = _linear_modules(model)
    targets = set(find_targets(model, config))
    experts = set(_expert_names(model))
    plan: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        name, which = _module_of_key(key)
        if name not in targets:
            if name in experts:
                raise CheckpointError(f"tensor {key}: LoRA on routed experts ({name}) is not supported")
            if name in linears:
                raise CheckpointError(f"tensor {key}: {name} is not among the adapter's target_modules")
            raise CheckpointError(f"tensor {key}: the model has no Linear module {name}")
        t = tensors[key]
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {key} has non-float dtype {t.dtype}")
        lin = linears[name][0]
        want = (config.r, lin.in_features) if which == "lora_A" else (lin.out_features, config.r)
        if tuple(t.shape) != want:
            raise CheckpointError(f"tensor {key} has shape {list(t.shape)} but r={config.r} and {name} "
                                  f"({lin.out_features}x{lin.in_features}) imply {list(want)}")
        plan.setdefault(name, {})[which] = t
    for name in (n for n in linears if n in targets):
        for which in ("lora_A", "lora_B"):
            if which not in plan.get(name, {}):
                raise CheckpointError(f"adapter lacks tensor {PEFT_PREFIX}{name}.{which}.weight")
    return plan


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str | Path, merge: bool = False,
                 adapter_name: str = "default") -> dict[str, Any]:
    """Load a PEFT LoRA adapter directory onto ``model``.

    The adapter is checked completely before the model changes. ``merge=True`` folds it into the base
    weights and removes the LoRA layers (generation then runs at base speed). Returns a summary:
    ``path, r, alpha, scaling, use_rslora, targets, modules, merged``."""
    d = Path(adapter_dir)
    if not d.exists():
        raise InputError(f"{d}: no such adapter directory")
    if not d.is_dir():
        raise InputError(f"{d}: the adapter must be a directory (adapter_config.json + {WEIGHTS_NAME})")
    config = LoraConfig.from_file(d / CONFIG_NAME)
    tensors = _read_adapter_tensors(d)
    if not tensors:
        raise CheckpointError(f"{d / WEIGHTS_NAME}: holds no tensors")
    try:
        plan = _plan(model, config, tensors)
    except InputError as e:
        if isinstance(e, CheckpointError):
            raise
        raise InputError(f"{d / CONFIG_NAME}: {e}") from None
    names = apply_lora(model, config, adapter_name=adapter_name, targets=list(plan))
    layers = lora_modules(model)
    for name in names:
        layer = layers[name]
        layer.lora_A.weight.copy_(plan[name]["lora_A"])
        layer.lora_B.weight.copy_(plan[name]["lora_B"])
    if merge:
        merge_and_unload(model)
    return {"path": str(d), "r": config.r, "alpha": config.lora_alpha, "scaling": config.scaling,
            "use_rslora": config.use_rslora, "targets": config.target_modules, "modules": len(names),
            "merged": merge}


def save_adapter(model: nn.Module, out_dir: str | Path, config: LoraConfig) -> dict[str, Any]:
    """Write the model's LoRA layers as a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors) that ``peft.PeftModel.from_pretrained`` loads onto transformers'
    NemotronHForCausalLM. Returns a summary: ``path, modules, tensors``."""
    from safetensors.torch import save_file

    layers = lora_modules(model)
    if not layers:
        raise InputError("the model has no LoRA layers to save (apply_lora or load_adapter without merge first)")
    for name, layer in layers.items():
        if layer.r != config.r:
            raise InputError(f"{name} has rank {layer.r} but the config says r={config.r}")
        if not math.isclose(layer.scaling, config.scaling, rel_tol=1e-6):
            raise InputError(f"{name} has scaling {layer.scaling:g} but the config implies {config.scaling:g}")
    expected = set(find_targets(model, config))
    if expected != set(layers):
        odd = sorted(expected ^ set(layers))[0]
        raise InputError(f"target_modules {config.target_modules!r} does not describe the model's LoRA layers "
                         f"({odd} is {'wrapped but not targeted' if odd in layers else 'targeted but not wrapped'})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().to("cpu").contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().to("cpu").contiguous()
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return {"path": str(out), "modules": len(layers), "tensors": len(tensors)}
