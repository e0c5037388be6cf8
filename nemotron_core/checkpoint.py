"""Safetensors I/O in the Hugging Face layout.

In memory the names follow the NeMo page (``model.embed_tokens``, stacked ``mixer.experts.up_proj``);
on disk they follow the HF checkpoint (``backbone.embeddings``, ``mixer.experts.{e}.up_proj.weight``).
Loading streams one tensor at a time into a model built on the meta device and materialised straight
in the target dtype and device, so the weights never exist twice. Only safetensors are read: pickled
``.bin`` files are refused, and nothing in a model directory is executed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import load_config
from .dtypes import cast_model, dtype_name, keeps_fp32, parse_dtype, target_dtype
from .errors import CheckpointError, ConfigError
from .io_utils import parse_size

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files that travel with the weights when a directory is converted or fine-tuned (never code).
CARRY_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)
_EXPERT = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(.*\.mixer\.experts)\.(up_proj|down_proj)$")
_RENAMES = (("backbone.embeddings.", "model.embed_tokens."), ("backbone.norm_f.", "model.norm."), ("backbone.", "model."))


# ---- names ----------------------------------------------------------------------------------------
def hf_to_internal(name: str) -> tuple[str, int | None]:
    """Checkpoint name -> (in-memory name, expert index for a stacked expert tensor or None)."""
    for old, new in _RENAMES:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    m = _EXPERT.match(name)
    if m:
        return f"{m[1]}.{m[3]}", int(m[2])
    return name, None


def internal_to_hf(name: str) -> str:
    name = name.replace("._checkpoint_wrapped_module", "")
    for old, new in _RENAMES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def hf_tensors(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under checkpoint names, experts unstacked, cast on the fly."""
    for name, tensor in model.state_dict().items():
        name = name.replace("._checkpoint_wrapped_module", "")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(target_dtype(name, dtype))
        m = _STACKED.match(name)
        if m:
            prefix = internal_to_hf(m[1])
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.{m[2]}.weight", tensor[e]
        else:
            yield internal_to_hf(name), tensor


# ---- reading --------------------------------------------------------------------------------------
def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory, checked to exist (index first, then single file)."""
    d = Path(model_dir)
    index = d / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (d / f).is_file():
                raise CheckpointError(f"{d / f}: shard listed in {INDEX_NAME} is missing")
        return [d / f for f in files]
    if (d / SINGLE_NAME).is_file():
        return [d / SINGLE_NAME]
    if any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise CheckpointError(f"{d}: only pickled .bin/.pt weights found; this toolkit loads safetensors only "
                              "(it never unpickles files). Convert them with transformers' save_pretrained first")
    raise CheckpointError(f"{d}: no model.safetensors or {INDEX_NAME} found")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({' '.join(str(e).split())})") from e


def stored_dtype(files: list[Path]) -> torch.dtype:
    """The dtype of the first tensor that is not fp32 by rule (what 'as stored' means)."""
    for path in files:
        with _open(path) as f:
            for key in f.keys():
                if not keeps_fp32(hf_to_internal(key)[0]):
                    return _slice_dtype(f, key)
    return torch.float32


_SAFE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _slice_dtype(f, key: str) -> torch.dtype:
    name = f.get_slice(key).get_dtype()
    if name not in _SAFE_DTYPES:
        raise CheckpointError(f"tensor {key} has unsupported dtype {name}")
    return _SAFE_DTYPES[name]


@torch.no_grad()
def load_weights(model: torch.nn.Module, files: list[Path]) -> list[str]:
    """Copy every checkpoint tensor into ``model`` (already materialised); returns ignored keys.

    Raises CheckpointError naming the first tensor that is unknown, missing or of the wrong shape."""
    params = dict(model.state_dict(keep_vars=True))
    params = {k.replace("._checkpoint_wrapped_module", ""): v for k, v in params.items()}
    seen: set[tuple[str, int | None]] = set()
    ignored: list[str] = []
    has_mtp = getattr(model, "mtp", None) is not None
    for path in files:
        with _open(path) as f:
            for key in f.keys():
                name, expert = hf_to_internal(key)
                if name not in params:
                    if name.startswith("mtp.") and not has_mtp:
                        ignored.append(key)  # as transformers does: an MTP head the model was built without
                        continue
                    raise CheckpointError(f"{path.name}: tensor {key} is not part of the model config.json describes")
                dst = params[name]
                want = tuple(dst.shape[1:]) if expert is not None else tuple(dst.shape)
                got = tuple(f.get_slice(key).get_shape())
                if expert is not None and expert >= dst.shape[0]:
                    raise CheckpointError(f"tensor {key}: expert {expert} but config.json has {dst.shape[0]} experts")
                if got != want:
                    raise CheckpointError(f"tensor {key} has shape {list(got)} but config.json implies {list(want)}")
                stored = f.get_slice(key).get_dtype()  # "BF16", "F32", "I32", ...
                if dst.is_floating_point() and not stored.startswith(("F", "BF")):
                    raise CheckpointError(f"tensor {key} is stored as {stored}, not as floating-point weights")
                try:
                    src = f.get_tensor(key)
                except (SafetensorError, OSError, ValueError) as e:
                    raise CheckpointError(f"{path}: cannot read tensor {key} ({e})") from e
                (dst[expert] if expert is not None else dst).copy_(src)
                seen.add((name, expert))
    for name, t in params.items():
        if _STACKED.match(name):
            missing = [e for e in range(t.shape[0]) if (name, e) not in seen]
            if missing:
                raise CheckpointError(f"checkpoint lacks {internal_to_hf(name.rsplit('.', 1)[0])}.{missing[0]}."
                                      f"{name.rsplit('.', 1)[1]}.weight ({len(missing)} experts missing)")
        elif (name, None) not in seen:
            raise CheckpointError(f"checkpoint lacks tensor {internal_to_hf(name)}")
    return ignored


def load_pretrained(cls, path: str | os.PathLike, *model_args: Any, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None, torch_dtype: torch.dtype | str | None = None,
                    **model_kwargs: Any):
    """``cls.from_config(config, *model_args, **model_kwargs)`` on meta, then the weights from ``path``.

    Positional arguments follow the reference's ``from_pretrained``: they go to ``from_config``, whose
    only positional parameter after the config is ``backend``; more, or ``backend`` given both ways, is
    Python's own TypeError."""
    d = Path(path)
    if not d.exists():
        raise ConfigError(f"{d}: no such model directory (models are read from local directories; nothing is downloaded)")
    if not d.is_dir():
        raise ConfigError(f"{d}: not a directory")
    config = load_config(d)
    files = weight_files(d)
    requested = dtype if dtype is not None else torch_dtype
    want = None if requested is None or requested == "auto" else parse_dtype(requested)
    if want is None:  # "auto": as stored
        want = stored_dtype(files)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = cls.from_config(config, *model_args, **model_kwargs)
    cast_model(model, want)  # on meta: decides each tensor's dtype without allocating anything
    model.to_empty(device=device)
    load_weights(model, files)
    gen = d / "generation_config.json"
    if gen.is_file():
        from transformers import GenerationConfig
        from transformers.utils import logging as hf_logging

        # Quiet: transformers warns about sampling fields set without do_sample (flags its generate would
        # ignore), which `nemotron generate` does use.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(d))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{gen}: invalid generation config ({e})") from e
        finally:
            hf_logging.set_verbosity(verbosity)
    model.eval()
    return model


# ---- writing --------------------------------------------------------------------------------------
def save_pretrained(model, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | str | None = None) -> dict[str, Any]:
    """Write config.json, generation_config.json and sharded safetensors with an index.

    Returns a summary: files, total bytes, number of tensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = parse_dtype(dtype) or model.dtype
    limit = parse_size(max_shard_size)
    # Pass 1 plans the shards from sizes alone; pass 2 casts and writes one shard at a time, so at
    # most one shard's worth of converted tensors exists beside the model.
    plan: list[int] = []
    size = 0
    count = 0
    for name, tensor in hf_tensors(model):
        nbytes = tensor.numel() * (target_dtype(name, dtype).itemsize if tensor.is_floating_point() else tensor.element_size())
        if count and size + nbytes > limit:
            plan.append(count)
            size = count = 0
        size += nbytes
        count += 1
    plan.append(count)
    for old in list(out.glob("model-*-of-*.safetensors")) + [out / SINGLE_NAME]:
        if old.exists():
            old.unlink()  # stale shards of an earlier save would disagree with the new index
    weight_map: dict[str, str] = {}
    total = 0
    tensors = hf_tensors(model, dtype)
    for i, n in enumerate(plan, 1):
        fname = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for _ in range(n):
            k, v = next(tensors)
            shard[k] = v.detach().to("cpu").contiguous()
            weight_map[k] = fname
            total += v.numel() * v.element_size()
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    config = model.config
    config.architectures = ["NemotronHForCausalLM"]
    config.dtype = dtype_name(dtype)
    config.save_pretrained(str(out))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    return {"files": len(plan), "bytes": total, "tensors": len(weight_map), "dtype": dtype_name(dtype)}


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Carry tokenizer and generation files from one model directory to another; a JSON file among
    them that does not parse is refused (rather than passed on to fail in whatever loads the copy)."""
    copied = []
    for name in CARRY_FILES:
        p = Path(src) / name
        if p.is_file():
            if p.suffix == ".json":
                try:
                    json.loads(p.read_text(encoding="utf-8"))
                except (ValueError, UnicodeDecodeError) as e:
                    raise ConfigError(f"{p}: not valid JSON ({e})") from None
            shutil.copy2(p, Path(dst) / name)
            copied.append(name)
    return copied
