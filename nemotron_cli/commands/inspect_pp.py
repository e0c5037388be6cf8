"""``nemotron inspect-pp``: plan a pipeline-parallel layout without loading any weights."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nemotron_cli.common import DType, DtypeOpt, JsonOpt, Output, QuietOpt, cli_command, example_epilog
from nemotron_core.presets import preset_names

SCHEDULES = ("1f1b", "gpipe")  # kept in step with nemotron_core.pipeline.SCHEDULES (a test checks)


def _complete_model(incomplete: str) -> list[str]:
    return [p for p in preset_names() if p.startswith(incomplete)]


def inspect_pp(
    model: Annotated[str, typer.Argument(help="A model directory (only config.json is read) or a preset name.",
                                         autocompletion=_complete_model)],
    stages: Annotated[int, typer.Option("--stages", "-s", help="Number of pipeline stages.")] = 2,
    balance: Annotated[str, typer.Option("--balance", help="Split by parameter count (params) or by layer count (layers).",
                                         autocompletion=lambda: ["params", "layers"])] = "params",
    microbatch_size: Annotated[int, typer.Option("--microbatch-size", help="Microbatch size for the transfer shapes.")] = 1,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Sequence length for the transfer shapes.")] = 4096,
    schedule: Annotated[str, typer.Option("--schedule", help="Pipeline schedule: 1f1b or gpipe.",
                                          autocompletion=lambda: list(SCHEDULES))] = "1f1b",
    microbatches: Annotated[int, typer.Option("--microbatches", "-m",
                                              help="Microbatches per step (default: 2 x stages).")] = 0,
    dtype: DtypeOpt = DType.bf16,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show how a model splits into pipeline stages: layers and block pattern per stage, parameters,
    weight memory, and the tensors each stage sends (hidden state, plus the MTP head's D future-token
    embeddings when the model has one). Everything is computed on the meta device: real sizes plan
    in seconds on a laptop.

    With a schedule (`1f1b` or `gpipe`) and a number of microbatches it also reports the idle
    (bubble) fraction and how many microbatches' activations each stage holds at once ("held").

    `--json` prints one object: `num_stages`, `balance`, `microbatch_size`, `seq_len`, `dtype`,
    `total_parameters`, `imbalance` (largest stage / mean), `schedule`, `microbatches`,
    `bubble_fraction`, and `stages`, a list of `{stage, layers [first, last], pattern, owns,
    parameters, weight_bytes, receives, sends, send_bytes, in_flight_microbatches}`.
    """
    from nemotron_core.config import load_config
    from nemotron_core.create import build_config
    from nemotron_core.errors import InputError
    from nemotron_core.io_utils import human_bytes, human_count
    from nemotron_core.pipeline import plan_stages

    out = Output(json_mode=json_out, quiet=quiet)
    if stages < 1 or microbatch_size < 1 or seq_len < 1 or microbatches < 0:
        raise InputError("--stages, --microbatch-size, --seq-len and --microbatches must be positive")
    if Path(model).exists():
        config = load_config(model)
    elif model in preset_names():
        config = build_config(model)
    else:
        raise InputError(f"{model}: neither a model directory nor a preset ({', '.join(preset_names())})")
    plan = plan_stages(config, stages, balance=balance, microbatch_size=microbatch_size, seq_len=seq_len,
                       dtype=dtype.to_torch(), schedule=schedule, microbatches=microbatches or None)

    def render(console) -> None:
        from rich.table import Table

        t = Table(title=f"{stages} stages balanced by {balance} (imbalance {plan['imbalance']:.2f}); "
                        f"{plan['schedule']}, {plan['microbatches']} microbatches: {plan['bubble_fraction']:.0%} idle")
        for col in ("stage", "layers", "pattern", "also owns", "params", "weights", "sends", "held"):
            t.add_column(col, justify="right" if col in ("stage", "params", "weights", "sends", "held") else "left",
                         no_wrap=col != "pattern")
        for s in plan["stages"]:
            sends = "-" if not s["send_bytes"] else f"{len(s['sends'])}x {human_bytes(s['send_bytes'] / len(s['sends']))}"
            t.add_row(str(s["stage"]), f"{s['layers'][0]}-{s['layers'][1]}", s["pattern"], ", ".join(s["owns"]) or "-",
                      human_count(s["parameters"]), human_bytes(s["weight_bytes"]), sends, str(s["in_flight_microbatches"]))
        console.print(t)

    out.emit(plan, render=render)


def register(app: typer.Typer) -> None:
    app.command("inspect-pp", epilog=example_epilog(
        "nemotron inspect-pp nemotron-3-nano-30b-a3b --stages 4",
        "nemotron inspect-pp ./model --stages 2 --balance layers --seq-len 8192 --json",
        "nemotron inspect-pp nemotron-h-8b --stages 4 --schedule gpipe --microbatches 16",
    ))(cli_command(inspect_pp))
