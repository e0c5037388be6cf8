"""``nemotron env``: versions of the stack and which kernel backends would be active.

JSON keys (``nemotron env --json``), stable for scripts and bug reports:

* ``nemotron``: version of this package.
* ``python``: ``{"version", "implementation", "executable", "platform"}``.
* ``packages``: distribution name -> version string, or ``null`` when not installed, for
  torch, transformers, safetensors, mamba-ssm, causal-conv1d, triton, transformer-engine,
  peft, lm-eval.
* ``torch``: ``{"version", "cuda_available", "cuda_version", "device_count", "device_name"}``
  (all ``null`` when torch is missing; ``device_name`` is that of device 0).
* ``backends``: ``mamba_ssm_triton``, ``flex_attention``, ``transformer_engine``, each
  ``{"available": bool, "requires": str, "missing": [str, ...]}``.
"""
from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import TYPE_CHECKING, Any

import typer

from nemotron_cli import __version__
from nemotron_cli.common import JsonOpt, Output, cli_command, example_epilog

if TYPE_CHECKING:
    from rich.console import Console

# Display name -> distribution names to try (TE 2.x ships the PyTorch part separately).
PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "safetensors": ("safetensors",),
    "mamba-ssm": ("mamba-ssm",),
    "causal-conv1d": ("causal-conv1d",),
    "triton": ("triton",),
    "transformer-engine": ("transformer-engine", "transformer-engine-torch"),
    "peft": ("peft",),
    "lm-eval": ("lm-eval",),
}


def _dist_version(names: tuple[str, ...]) -> str | None:
    # Metadata only: importing mamba_ssm / transformer_engine is slow and can crash without CUDA.
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _torch_info() -> dict[str, Any]:
    info: dict[str, Any] = dict.fromkeys(
        ("version", "cuda_available", "cuda_version", "device_count", "device_name"))
    try:
        import torch  # the one heavy import `env` allows itself: CUDA state needs it
    except ImportError:
        return info
    cuda = torch.cuda.is_available()
    info.update(version=torch.__version__, cuda_available=cuda, cuda_version=torch.version.cuda,
                device_count=torch.cuda.device_count() if cuda else 0,
                device_name=torch.cuda.get_device_name(0) if cuda else None)
    return info


def _has_flex_attention() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    except ImportError:  # torch (or torch.nn.attention, torch<2.5) missing
        return False


def _backend(requires: str, missing: list[str]) -> dict[str, Any]:
    return {"available": not missing, "requires": requires, "missing": missing}


def collect_env() -> dict[str, Any]:
    """Gather the report (see the module docstring for the keys)."""
    packages = {name: _dist_version(dists) for name, dists in PACKAGES.items()}
    torch_info = _torch_info()
    no_cuda = [] if torch_info["cuda_available"] else ["CUDA"]
    return {
        "nemotron": __version__,
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
            "platform": platform.platform(),
        },
        "packages": packages,
        "torch": torch_info,
        "backends": {
            "mamba_ssm_triton": _backend(
                "CUDA + mamba-ssm", no_cuda + ([] if packages["mamba-ssm"] else ["mamba-ssm"])),
            "nemotron_triton": _backend(
                "CUDA + triton", no_cuda + ([] if packages["triton"] else ["triton"])),
            "flex_attention": _backend(
                "torch>=2.5", [] if _has_flex_attention() else ["torch.nn.attention.flex_attention"]),
            "transformer_engine": _backend(
                "CUDA + transformer-engine",
                no_cuda + ([] if packages["transformer-engine"] else ["transformer-engine"])),
        },
    }


_BACKEND_LABELS = {
    "mamba_ssm_triton": "mamba_ssm triton kernels",
    "nemotron_triton": "our triton kernels (conv, MoE routing/combine, relu2)",
    "flex_attention": "flex attention",
    "transformer_engine": "transformer-engine",
}


def _render(report: dict[str, Any], console: Console) -> None:
    from rich.table import Table

    table = Table(title="nemotron env", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("nemotron", report["nemotron"])
    py = report["python"]
    table.add_row("python", f"{py['version']} ({py['implementation']}, {py['executable']})")
    table.add_row("platform", py["platform"])
    for name, version in report["packages"].items():
        table.add_row(name, version or "[dim]not installed[/dim]")
    t = report["torch"]
    if t["version"] is not None:
        cuda = (f"yes, CUDA {t['cuda_version']}, {t['device_count']} x {t['device_name']}"
                if t["cuda_available"] else "no")
        table.add_row("torch.cuda.is_available()", cuda)
    console.print(table)
    for key, info in report["backends"].items():
        state = "[green]available[/green]" if info["available"] else "[yellow]unavailable[/yellow]"
        detail = f"needs {info['requires']}"
        if info["missing"]:
            detail += f"; missing: {', '.join(info['missing'])}"
        console.print(f"{_BACKEND_LABELS[key]}: {state} ({detail})", soft_wrap=True)


def env(json_out: JsonOpt = False) -> None:
    """Show Python, torch and library versions and which kernel backends would be active.

    Paste the output into bug reports. Heavy optional packages are detected from their
    metadata, without importing them.
    """
    out = Output(json_mode=json_out)
    report = collect_env()
    out.emit(report, render=lambda console: _render(report, console))


def register(app: typer.Typer) -> None:
    app.command("env", epilog=example_epilog("nemotron env", "nemotron env --json | jq .backends"))(
        cli_command(env))
