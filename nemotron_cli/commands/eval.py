"""``nemotron eval``: perplexity on JSON Lines data, or lm-evaluation-harness tasks.

Two modes; pass exactly one of ``--data`` and ``--tasks``.

Perplexity (``--data FILE.jsonl``): the same records as ``nemotron finetune`` (``{"text"}``,
``{"prompt", "completion"}``, ``{"messages"}``), scored on the tokens fine-tuning trains: every token of a
text, the completion and its EOS, the assistant turns. The loss is the token-weighted mean negative
log-likelihood in nats (fp32 log-softmax, fp64 sums), so ``perplexity = exp(loss)`` and
``bits_per_token = loss / ln 2``. Examples longer than ``--max-length`` tokens (default: the model's
``max_position_embeddings``) are cut; ``--pack`` packs them into THD rows instead of padding (same
numbers). A malformed line is one ``error:`` line naming it (exit code 2). ``--json`` prints::

    {"model": "./model", "adapter": null, "data": "dev.jsonl",
     "loss": 2.31,                 # mean NLL per scored token (nats)
     "perplexity": 10.07,          # exp(loss)
     "bits_per_token": 3.33,       # loss / ln 2
     "tokens": 5120,               # scored tokens
     "examples": 100,              # examples in the file
     "seconds": 1.9}               # time spent scoring (loading excluded)

lm-evaluation-harness (``--tasks T1,T2``; needs ``pip install 'nemotron[eval]'``): task names or glob
patterns as lm-eval knows them, or task YAMLs from ``--include-path DIR`` (e.g. ``dataset_path: json``
with local ``data_files``: no network needed). ``--num-fewshot`` and ``--limit`` (documents per task) are
passed to ``lm_eval.simple_evaluate``; ``--max-length`` is the context window. Built-in tasks load their
datasets through ``datasets`` from its local cache only: nothing is downloaded. Human mode prints
lm-eval's results table on stderr. ``--json`` prints::

    {"model": "./model", "adapter": null, "tasks": ["arc_easy"], "num_fewshot": null, "limit": 100,
     "results": {"arc_easy": {"acc,none": 0.61, "acc_stderr,none": 0.05, ...}},   # lm-eval's "results"
     "groups": {...}, "n_shot": {"arc_easy": 0}, "n_samples": {"arc_easy": {"original": 2376, "effective": 100}},
     "versions": {"arc_easy": 1.0}, "higher_is_better": {"arc_easy": {"acc": true}}, "seconds": 12.3}

``--adapter DIR`` merges a PEFT-format LoRA adapter into the weights first. The default dtype is fp32 on
CPU, bf16 on CUDA.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nemotron_cli.common import DType, DeviceOpt, Output, QuietOpt, cli_command, example_epilog
from nemotron_core.backend import resolve_device
from nemotron_core.errors import InputError, NemotronError
from nemotron_core.tokenizer import load_tokenizer

INSTALL_HINT = "pip install 'nemotron[eval]'"  # kept equal to nemotron_core.evaluation.LM_EVAL_HINT (a test checks)


def _check_options(data: Path | None, tasks: str | None, pack: bool, include_path: Path | None,
                   num_fewshot: int | None, limit: int | None, batch_size: int, max_length: int | None) -> None:
    if data is not None and tasks is not None:
        raise InputError("--data and --tasks cannot be used together: pass --data FILE.jsonl (perplexity) "
                         "or --tasks T1,T2 (lm-evaluation-harness)")
    if data is None and tasks is None:
        raise InputError("nothing to evaluate: pass --data FILE.jsonl (perplexity) or --tasks T1,T2 "
                         "(lm-evaluation-harness)")
    if data is not None:
        for flag, value in (("--include-path", include_path), ("--num-fewshot", num_fewshot), ("--limit", limit)):
            if value is not None:
                raise InputError(f"{flag} applies to --tasks, not --data")
    elif pack:
        raise InputError("--pack applies to --data, not --tasks")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if max_length is not None and max_length < 2:
        raise InputError(f"--max-length must be at least 2, got {max_length}")
    if num_fewshot is not None and num_fewshot < 0:
        raise InputError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    if tasks is not None and not [t for t in tasks.split(",") if t.strip()]:
        raise InputError("--tasks is empty")


def _check_paths(model: Path, data: Path | None, adapter: Path | None) -> None:
    if not model.is_dir():
        raise InputError(f"{model}: no such model directory" if not model.exists() else f"{model}: not a directory")
    if data is not None and not data.is_file():
        raise InputError(f"--data {data}: no such file" if not data.exists() else f"--data {data}: not a file")
    if adapter is not None and not adapter.is_dir():
        raise InputError(f"--adapter {adapter}: no such adapter directory" if not adapter.exists()
                         else f"--adapter {adapter}: not a directory")


def _require_lm_eval() -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:  # look without importing (it is slow, and pulls in datasets)
        raise InputError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")


def _quiet_third_party(out: Output) -> None:
    """Progress bars only on a terminal (CLI conventions): tqdm and datasets read these variables when
    they are first imported, which in a fresh process is after this point."""
    if out.quiet or out.json_mode or not (sys.stderr is not None and sys.stderr.isatty()):
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def eval_command(
    model: Annotated[Path, typer.Argument(help="Model directory (Hugging Face layout, with a tokenizer).",
                                          show_default=False)],
    data: Annotated[Optional[Path], typer.Option(
        "--data", "-d", help="Perplexity on JSON Lines data: text, prompt + completion, or messages per line.",
        show_default=False)] = None,
    tasks: Annotated[Optional[str], typer.Option(
        "--tasks", "-t", help="lm-evaluation-harness tasks, comma-separated (names, globs or task YAML paths).",
        show_default=False)] = None,
    adapter: Annotated[Optional[Path], typer.Option(
        "--adapter", help="PEFT LoRA adapter directory, merged into the model first.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per forward pass.")] = 8,
    pack: Annotated[bool, typer.Option("--pack", help="--data: pack examples into rows (THD, no padding).")] = False,
    max_length: Annotated[Optional[int], typer.Option(
        "--max-length", help="Longest example (--data: longer ones are cut) or context window (--tasks). "
                             "[default: the model's max_position_embeddings]", show_default=False)] = None,
    include_path: Annotated[Optional[Path], typer.Option(
        "--include-path", help="--tasks: a folder of lm-eval task YAMLs.", show_default=False)] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(
        "--num-fewshot", help="--tasks: few-shot examples per prompt. [default: each task's own]",
        show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", help="--tasks: at most N documents per task.", show_default=False)] = None,
    device: DeviceOpt = "auto",
    dtype: Annotated[Optional[DType], typer.Option("--dtype", case_sensitive=False,
                                                   help="Compute dtype. [default: fp32 on CPU, bf16 on CUDA]")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout; see above.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a model: perplexity on JSON Lines data (`--data`), or lm-evaluation-harness tasks (`--tasks`).

    `--data` takes the records of `nemotron finetune` and scores the tokens fine-tuning trains (all of
    a `text`, the `completion` and EOS, the assistant turns of `messages`): loss = mean NLL per token
    (nats), perplexity = exp(loss), bits per token = loss / ln 2. `--pack` gives the same numbers with
    less padding.

    `--tasks` runs lm-eval tasks (`pip install 'nemotron[eval]'`); `--include-path DIR` adds local task
    YAMLs (`dataset_path: json` + `dataset_kwargs: {data_files: ...}` runs offline). `--num-fewshot`,
    `--limit` go to `lm_eval.simple_evaluate`.

    `--json` (perplexity): `{"model", "adapter", "data", "loss", "perplexity", "bits_per_token", "tokens",
    "examples", "seconds"}`. `--json` (tasks): `{"model", "adapter", "tasks", "num_fewshot", "limit",
    "results", "groups", "n_shot", "n_samples", "versions", "higher_is_better", "seconds"}`, where
    `results` is lm-eval's per-task metrics (`"acc,none"`, ...).
    """
    out = Output(json_mode=json_out, quiet=quiet or json_out)
    _check_options(data, tasks, pack, include_path, num_fewshot, limit, batch_size, max_length)
    _check_paths(model, data, adapter)
    if tasks is not None:
        _require_lm_eval()
    _quiet_third_party(out)

    from nemotron_core.config import load_config

    config = load_config(model)  # a broken config.json fails before anything heavy is read
    limit_pos = getattr(config, "max_position_embeddings", None)
    if max_length is not None and limit_pos and max_length > limit_pos:
        raise InputError(f"--max-length {max_length} exceeds the model's limit of {limit_pos} positions")
    dev = resolve_device(device)
    if dtype is None:
        dtype = DType.bf16 if dev.type == "cuda" else DType.fp32
    if data is not None:
        _perplexity(out, model, data, adapter, batch_size, pack, max_length or limit_pos or 4096, dev, dtype)
    else:
        assert tasks is not None
        _lm_eval(out, model, tasks, adapter, batch_size, max_length, include_path, num_fewshot, limit, dev, dtype)


def _perplexity(out: Output, model: Path, data: Path, adapter: Path | None, batch_size: int, pack: bool,
                max_length: int, dev: Any, dtype: DType) -> None:
    import time

    from rich.markup import escape

    from nemotron_core.data import load_examples
    from nemotron_core.evaluation import load_for_eval, perplexity

    t0 = time.perf_counter()
    with out.working(f"loading {model} ..."):
        tok = load_tokenizer(model)
        examples = load_examples(data, tok, max_length)  # bad data fails before the weights are read
        lm, tok = load_for_eval(model, adapter=adapter, device=dev, dtype=dtype.to_torch(), tokenizer=tok)
    out.info(escape(f"loaded {model}{f' + {adapter}' if adapter else ''} on {dev} in {dtype} "
                    f"({time.perf_counter() - t0:.1f} s); {len(examples)} examples"))
    pad_id = next((int(v) for v in (tok.pad_token_id, tok.eos_token_id) if v is not None), 0)
    t1 = time.perf_counter()
    with out.progress() as progress:
        task = progress.add_task("scoring", total=None)
        report = perplexity(lm, examples, batch_size=batch_size, pack=pack, pad_id=pad_id,
                            on_batch=lambda done, total: progress.update(task, completed=done, total=total))
    seconds = time.perf_counter() - t1
    if not math.isfinite(report["loss"]):  # no score to report (and NaN is not JSON)
        raise NemotronError(f"{model}: the loss is {report['loss']}: the model's logits are not finite; "
                            "are its weights finite?")
    result = {"model": str(model), "adapter": None if adapter is None else str(adapter), "data": str(data),
              "loss": report["loss"], "perplexity": report["perplexity"], "bits_per_token": report["bits_per_token"],
              "tokens": report["tokens"], "examples": report["examples"], "seconds": round(seconds, 6)}

    def render(console) -> None:
        console.print(escape(f"loss {report['loss']:.4f} nats/token | perplexity {report['perplexity']:.4f} | "
                             f"{report['bits_per_token']:.4f} bits/token | {report['tokens']} tokens in "
                             f"{report['examples']} examples | {seconds:.2f} s"), soft_wrap=True)

    out.emit(result, render)


def _lm_eval(out: Output, model: Path, tasks: str, adapter: Path | None, batch_size: int, max_length: int | None,
             include_path: Path | None, num_fewshot: int | None, limit: int | None, dev: Any, dtype: DType) -> None:
    import time

    from rich.markup import escape

    from nemotron_core.evaluation import make_lm_eval_model, resolve_tasks, run_lm_eval

    names, manager = resolve_tasks(tasks.split(","), include_path)  # unknown tasks fail before loading
    t0 = time.perf_counter()
    with out.working(f"loading {model} ..."):
        lm = make_lm_eval_model(model, adapter=adapter, batch_size=batch_size, max_length=max_length,
                                device=str(dev), dtype=dtype.to_torch())
    out.info(escape(f"loaded {model}{f' + {adapter}' if adapter else ''} on {dev} in {dtype} "
                    f"({time.perf_counter() - t0:.1f} s); tasks: {', '.join(names)}"))
    t1 = time.perf_counter()
    results = run_lm_eval(lm, names, num_fewshot=num_fewshot, limit=limit, task_manager=manager)
    seconds = time.perf_counter() - t1
    doc = {"model": str(model), "adapter": None if adapter is None else str(adapter), "tasks": names,
           "num_fewshot": num_fewshot, "limit": limit, "results": results.get("results", {}),
           "groups": results.get("groups", {}), "n_shot": results.get("n-shot", {}),
           "n_samples": results.get("n-samples", {}), "versions": results.get("versions", {}),
           "higher_is_better": results.get("higher_is_better", {}), "seconds": round(seconds, 6)}

    def render(console) -> None:
        from lm_eval.utils import make_table

        console.print(make_table(results), markup=False, highlight=False, soft_wrap=True)
        if results.get("groups"):
            console.print(make_table(results, "groups"), markup=False, highlight=False, soft_wrap=True)
        console.print(f"{seconds:.1f} s", markup=False, highlight=False)

    out.emit(doc, render)


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=example_epilog(
        "nemotron eval ./model --data dev.jsonl",
        "nemotron eval ./model --data dev.jsonl --adapter runs/lora/final --pack --json | jq .perplexity",
        "nemotron eval ./model --tasks arc_easy,hellaswag --num-fewshot 0 --limit 200",
        "nemotron eval ./model --tasks my_task --include-path ./tasks --json > results.json",
    ))(cli_command(eval_command))
