"""``nemotron convert``: cast and reshard a model directory, atomically, optionally verified."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nemotron_cli.common import DType, ForceOpt, JsonOpt, MaxShardSizeOpt, Output, QuietOpt, cli_command, example_epilog


def convert(
    src: Annotated[Path, typer.Argument(help="Source model directory (Hugging Face layout, safetensors).")],
    dst: Annotated[Path, typer.Argument(help="Output directory (must not exist or be empty, unless --force).")],
    dtype: Annotated[Optional[DType], typer.Option("--dtype", case_sensitive=False,
                                                   help="Target dtype (default: as stored). fp32-only tensors stay fp32.")] = None,
    max_shard_size: MaxShardSizeOpt = "5GB",
    verify: Annotated[bool, typer.Option("--verify", help="Reload the output and compare logits with the source.")] = False,
    adapter: Annotated[Optional[Path], typer.Option(
        "--adapter", help="Merge this PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) "
                          "into the weights, writing a plain model.")] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a model directory: change dtype, reshard, carry config, generation config and tokenizer.

    The fp32-only tensors (Mamba A_log, D, dt_bias; router weight and correction bias) stay fp32.
    The output is written to a temporary sibling and renamed when complete.

    `--adapter DIR` merges a PEFT-format LoRA adapter (computed in fp32, rounded once on save).

    `--json` prints one object: `source`, `path`, `source_dtype`, `dtype`, `files`, `tensors`,
    `size_bytes`, `size`, `adapter` (when given), and with `--verify` also `verify` (`max_abs_diff`,
    `max_rel_diff`, `tolerance_rel`, `ok`).
    """
    from nemotron_core.convert import convert_model_dir

    out = Output(json_mode=json_out, quiet=quiet)
    with out.working(f"converting {src} -> {dst} ..."):
        report = convert_model_dir(src, dst, dtype=dtype.value if dtype else None, max_shard_size=max_shard_size,
                                   verify=verify, force=force, adapter=adapter)
    out.emit(report)


def register(app: typer.Typer) -> None:
    app.command("convert", epilog=example_epilog(
        "nemotron convert ./model ./model-bf16 --dtype bf16 --verify",
        "nemotron convert ./model ./resharded --max-shard-size 500MB --json",
        "nemotron convert ./base ./merged --adapter ./my-lora --verify",
    ))(cli_command(convert))
