"""BackendConfig: which implementation runs each op, and discovery of the optional fast kernels.

Every op has a plain-PyTorch reference (``nemotron_core.ops``). ``"auto"`` picks the fastest
implementation that is installed and applicable (mamba_ssm's Triton kernels need CUDA); an explicit
choice that cannot run raises instead of silently falling back.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

ATTN_CHOICES = ("auto", "sdpa", "eager", "flex")
EXPERTS_CHOICES = ("grouped", "loop")
MAMBA_CHOICES = ("auto", "torch", "triton")
# transformer-engine linear/norm backends are not wired in yet: only choices that run are accepted.
NORM_CHOICES = ("torch",)
# "triton": batch-1 decode projections (one row, no autograd) as one Triton GEMV each; "auto": those
# of them where the GEMV measured faster than cuBLAS on the H200 (modeling/linear.py), on CUDA.
LINEAR_CHOICES = ("auto", "torch", "triton")


@dataclass
class BackendConfig:
    """Implementation choice per op. Fields mirror NeMo AutoModel's BackendConfig where they overlap."""

    attn: str = "auto"
    linear: str = "auto"
    rms_norm: str = "torch"
    experts: str = "grouped"
    mamba: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, choices in (
            ("attn", ATTN_CHOICES), ("linear", LINEAR_CHOICES), ("rms_norm", NORM_CHOICES),
            ("experts", EXPERTS_CHOICES), ("mamba", MAMBA_CHOICES),
        ):
            value = getattr(self, name)
            if value not in choices:
                from .errors import InputError

                raise InputError(f"backend {name}={value!r} is not one of {', '.join(choices)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=None)
def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def mamba_triton_ops() -> dict[str, Callable] | None:
    """mamba_ssm's Triton entry points, or None when mamba_ssm is absent.

    A pure-Python mamba_ssm wheel (built without its CUDA extensions) still has the Triton kernels,
    but its package ``__init__`` imports the compiled selective-scan module; importing the Triton
    submodules directly sidesteps that.
    """
    if not module_available("mamba_ssm"):
        return None
    try:
        _import_mamba_package_without_cuda_extension()
        ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        state = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
        norm = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
    except Exception:  # a broken install is the same as none: the reference path still runs
        return None
    return {
        "chunk_scan": ssd.mamba_chunk_scan_combined,
        "state_update": state.selective_state_update,
        "gated_rmsnorm": norm.rmsnorm_fn,
    }


def _import_mamba_package_without_cuda_extension() -> None:
    """Make ``import mamba_ssm.ops.triton.*`` work when the compiled extension is absent.

    mamba_ssm's package ``__init__`` imports ``selective_scan_cuda`` unconditionally; a wheel built
    without CUDA extensions (the Triton kernels are pure Python) fails there. If that happens we
    register the package without running its ``__init__`` so its Triton submodules import normally.
    """
    if "mamba_ssm" in sys.modules:
        return
    try:
        importlib.import_module("mamba_ssm")
    except ImportError:
        spec = importlib.util.find_spec("mamba_ssm")
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations or [])
        pkg.__spec__ = spec
        pkg.__file__ = spec.origin
        sys.modules["mamba_ssm"] = pkg


def resolve_mamba(backend: BackendConfig, device_type: str) -> str:
    if backend.mamba == "torch":
        return "torch"
    usable = device_type == "cuda" and mamba_triton_ops() is not None
    if backend.mamba == "triton" and not usable:
        from .errors import InputError

        raise InputError("backend mamba='triton' needs CUDA and the mamba-ssm package (pip install 'nemotron[gpu]')")
    return "triton" if usable else "torch"


def resolve_attn(backend: BackendConfig, device_type: str, packed: bool = False,
                 dtype=None, head_dim: int | None = None) -> str:
    """auto: FlexAttention's document mask for packed bf16/fp16 batches on CUDA, SDPA otherwise.

    Inductor's flex kernel has no fp32 variant on Hopper (NoValidChoicesError, seen on an H200 with
    torch 2.11) and was only measured at head_dim 128, so smaller or fp32 cases keep the exact
    masked SDPA path."""
    if backend.attn == "auto":
        import torch

        flex_ok = dtype in (torch.bfloat16, torch.float16) and (head_dim or 0) >= 64
        if packed and device_type == "cuda" and flex_ok and module_available("torch.nn.attention.flex_attention"):
            return "flex"
        return "sdpa"
    if backend.attn == "flex" and device_type != "cuda":
        from .errors import InputError

        raise InputError("backend attn='flex' needs CUDA (on CPU use sdpa or eager)")
    return backend.attn


def resolve_device(device: str):
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` -> a torch.device, checked."""
    import torch

    from .errors import InputError

    d = device.strip().lower()
    if d not in ("auto", "cpu", "cuda") and not (d.startswith("cuda:") and d[5:].isdigit()):
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available (try --device cpu)")
    dev = torch.device(d)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def describe_backends() -> dict[str, Any]:
    """What `nemotron env` reports: which fast paths could be active on this machine."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "cuda": cuda,
        "mamba_triton": cuda and mamba_triton_ops() is not None,
        "flex_attention": module_available("torch.nn.attention.flex_attention"),
        "grouped_mm": hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm"),
        "transformer_engine": module_available("transformer_engine"),
    }
