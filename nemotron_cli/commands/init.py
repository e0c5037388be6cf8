"""``nemotron init``: create a model directory (config, tokenizer, random weights) from a preset."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nemotron_cli.common import (DType, DtypeOpt, ForceOpt, JsonOpt, MaxShardSizeOpt, Output, QuietOpt, cli_command,
                                 example_epilog)
from nemotron_core.errors import InputError
from nemotron_core.presets import DESCRIPTIONS, preset_names


def _complete_preset(incomplete: str) -> list[str]:
    return [p for p in preset_names() if p.startswith(incomplete)]


def init(
    out_dir: Annotated[Optional[Path], typer.Argument(help="Directory to create (must not exist or be empty).")] = None,
    preset: Annotated[str, typer.Option("--preset", "-p", help="Model shape; see --list.",
                                        autocompletion=_complete_preset)] = "tiny",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: key=value (repeatable).")] = None,
    dtype: DtypeOpt = DType.bf16,
    seed: Annotated[int, typer.Option("--seed", help="Random seed for the weights.")] = 0,
    no_weights: Annotated[bool, typer.Option("--no-weights", help="Write config and tokenizer only (for planning real shapes).")] = False,
    max_shard_size: MaxShardSizeOpt = "5GB",
    list_: Annotated[bool, typer.Option("--list", help="List the presets with parameter counts and exit.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Create a Hugging Face-layout model directory with random weights from a preset.

    Writes config.json, generation_config.json, an offline byte-level tokenizer with a chat template
    and sharded safetensors with an index, all at once: the directory appears only when complete.

    `--set key=value` overrides one config key; values are checked as a config.json's would be (an
    integer is fine where a number is expected, not the reverse). The layers come from the pattern:
    `--set hybrid_override_pattern=M*E-` (one letter per layer: M Mamba2, * attention, - MLP,
    E MoE) sets the depth. `num_hidden_layers` only restates it: it may be set, in any order, but
    must equal the pattern's length, so `--set num_hidden_layers=N` alone is an error unless the
    preset's pattern already has N layers (set the pattern instead).

    `--json` prints one object: `path`, `preset`, `pattern`, `layers`, `mtp_depths`, `mtp_pattern`,
    `hidden_size`, `vocab_size`, `parameters` (`total`, `active`), `dtype`, `seed`, `weights`,
    `size_bytes`, `size`, `tokenizer_vocab`. With `--list`: `{"presets": [{"name", "description",
    "pattern", "layers", "mtp_depths", "total_parameters", "active_parameters"}, ...]}`.
    """
    out = Output(json_mode=json_out, quiet=quiet)
    if list_:
        return _list_presets(out)
    if out_dir is None:
        raise InputError("missing OUT_DIR (or pass --list to see the presets)")
    from nemotron_core.create import create_model_dir

    with out.working(f"creating {out_dir} from preset {preset} ..."):
        summary = create_model_dir(out_dir, preset=preset, overrides=set_ or [], dtype=dtype.value, seed=seed,
                                   weights=not no_weights, max_shard_size=max_shard_size, force=force)
    out.emit(summary, render=lambda c: _render_summary(c, summary))


def _render_summary(console, s: dict) -> None:
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    p = s["parameters"]
    rows = [
        ("path", s["path"]), ("preset", s["preset"]), ("pattern", f"{s['pattern']} ({s['layers']} layers)"),
        ("mtp", f"{s['mtp_depths']} depth(s) of {s['mtp_pattern']}" if s["mtp_depths"] else "none"),
        ("parameters", f"{p['total']:,} total, {p['active']:,} active per token"),
        ("dtype", s["dtype"]), ("weights", "random (seed %d)" % s["seed"] if s["weights"] else "none (--no-weights)"),
        ("size on disk", s["size"]),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    console.print(t)


def _list_presets(out: Output) -> None:
    from nemotron_core.create import build_config, summarize
    from nemotron_core.io_utils import human_count

    rows = []
    for name in preset_names():
        s = summarize(build_config(name))
        rows.append({"name": name, "description": DESCRIPTIONS[name], "pattern": s["pattern"], "layers": s["layers"],
                     "mtp_depths": s["mtp_depths"], "total_parameters": s["parameters"]["total"],
                     "active_parameters": s["parameters"]["active"]})

    def render(console) -> None:
        from rich.table import Table

        t = Table(title=None)
        # Names and numbers never wrap or get cut (a preset name is something to type); only the
        # description wraps, folding long words rather than ending them in an ellipsis.
        t.add_column("preset", no_wrap=True, min_width=max(len(r["name"]) for r in rows))
        for col in ("layers", "total params", "active params"):
            t.add_column(col, justify="right", no_wrap=True)
        t.add_column("description", overflow="fold", min_width=len("description"))
        for r in rows:
            t.add_row(r["name"], str(r["layers"]), human_count(r["total_parameters"]), human_count(r["active_parameters"]),
                      r["description"])
        console.print(t)

    out.emit({"presets": rows}, render=render)


def register(app: typer.Typer) -> None:
    app.command("init", epilog=example_epilog(
        "nemotron init ./tiny-model",
        "nemotron init ./nano --preset nemotron-3-nano-30b-a3b --no-weights --json",
        "nemotron init ./small --preset tiny --set hidden_size=128 --set hybrid_override_pattern='M*M-' --dtype fp32",
    ))(cli_command(init))
