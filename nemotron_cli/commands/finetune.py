"""``nemotron finetune``: LoRA or full fine-tuning on JSON Lines data, with checkpoints and exact resume.

Data (``--data``, ``--eval-data``): JSON Lines, one example per line: ``{"text": ...}`` (every token
trained), ``{"prompt": ..., "completion": ...}`` (only the completion trained) or ``{"messages": [...]}``
(chat template; the assistant turns trained). Examples longer than ``--max-length`` tokens are
truncated. Malformed lines are one ``error:`` line naming the line number (exit code 2).

Training: ``--steps N`` optimizer steps, or ``--epochs E`` passes over the data (default: one epoch).
A step consumes ``--batch-size`` x ``--grad-accum`` examples (or ``--pack``ed rows); the loss is the
mean over the trained tokens of the whole step. LR: linear warmup over ``--warmup-steps``, then
``--schedule`` cosine | linear | constant. Default ``--lr``: 2e-4 with LoRA, 2e-5 with ``--full``. On CUDA
compute is bf16 (``--dtype``): a frozen LoRA base is loaded in bf16 (the adapters stay fp32), full
fine-tuning keeps fp32 master weights under bf16 autocast; on the CPU everything is fp32. Same seed, data and options:
the same run.

Output directory (new or empty; ``--force`` replaces it, ``--resume`` continues in it). ``--force`` moves
the old output aside (``.NAME.replaced-PID`` beside it) and deletes it once the new run has completed its
first checkpoint (from then on the new run can be resumed); a run that fails before that puts it back. A
run that fails before completing a checkpoint removes what it created, so the same command can simply be
run again; checkpoints that were completed are kept (the error line says so: ``--resume`` continues)::

    metrics.jsonl               one JSON object per log step (the "log" events below, without "event")
    checkpoints/step-N/         every --save-every steps, at the end, and on Ctrl-C (the newest 2 kept)
    final/                      LoRA: PEFT adapter (adapter_config.json + adapter_model.safetensors);
                                --full: a complete model directory (config, weights, tokenizer)
    merged/                     with --merge: base + adapter as a complete model directory

``--resume`` continues from the newest checkpoint and reproduces the run that was not interrupted
(same options needed; ``--steps``/``--epochs`` may be raised to train longer). Resuming a finished run
trains nothing and rewrites final/ (an info line says so); asking for fewer steps than the checkpoint
has is an error (exit code 2: there is nothing to do). Ctrl-C saves a checkpoint of the last finished
step and exits 130.

Failures (exit code 1, one ``error:`` line): a NaN/inf loss or gradient norm stops the run at that
step (``training diverged at step N (loss nan); no final adapter written``; earlier checkpoints stay),
and a failed write names the path and the reason (``cannot write run/...: no space left on device``).
``--lora-r`` above the rank the narrowest targeted layer can use (min(in, out) features) is refused
before training (exit code 2).

Output. Human mode: one line per log step on stderr (step, epoch, loss, lr, grad norm, tokens/s,
eval loss) and a summary. ``--json``: JSON Lines on stdout, nothing else::

    {"event": "log", "step": 10, "total_steps": 100, "epoch": 0.25, "loss": 2.31, "lr": 0.0002,
     "grad_norm": 0.84, "tokens": 10240, "tokens_per_s": 5120.0, "elapsed_s": 2.0,
     "eval_loss": 2.4}                       # eval_loss only on steps that evaluated
    {"event": "done", "output": "run", "final": "run/final", "merged": null, "steps": 100,
     "total_steps": 100, "epoch": 2, "train_loss": 1.2, "eval_loss": 1.3, "tokens": 102400,
     "resumed_from": null, "trainable_parameters": 81920, "elapsed_s": 20.0}
    {"event": "interrupted", "step": 42, "checkpoint": "run/checkpoints/step-42"}   # on Ctrl-C

``loss`` is the train loss per trained token averaged over the steps since the previous log line;
``tokens`` counts trained tokens so far.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nemotron_cli.common import DType, DeviceOpt, Output, QuietOpt, cli_command, example_epilog
from nemotron_core.backend import resolve_device
from nemotron_core.errors import InputError, NemotronError
from nemotron_core.tokenizer import load_tokenizer

SCHEDULES = ("cosine", "linear", "constant")  # kept in step with nemotron_core.training.SCHEDULES (a test checks)
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,in_proj,up_proj,down_proj"
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}
# TrainConfig field -> the flag that sets it (its errors then name the flag).
_FLAGS = {"lr": "--lr", "warmup_steps": "--warmup-steps", "max_steps": "--steps", "epochs": "--epochs",
          "schedule": "--schedule", "grad_accum": "--grad-accum", "batch_size": "--batch-size",
          "log_every": "--log-every", "save_every": "--save-every", "eval_every": "--eval-every", "seed": "--seed"}


def _flag_error(e: InputError) -> InputError:
    name = getattr(e, "field", None)
    if name in _FLAGS:
        return InputError(f"{_FLAGS[name]} {e.detail}")  # type: ignore[attr-defined]
    return e


def _check_paths(model: Path, data: Path, eval_data: Path | None, output: Path) -> None:
    if not model.is_dir():
        raise InputError(f"{model}: no such model directory" if not model.exists() else f"{model}: not a directory")
    for flag, p in (("--data", data), ("--eval-data", eval_data)):
        if p is not None and not p.is_file():
            raise InputError(f"{flag} {p}: no such file" if not p.exists() else f"{flag} {p}: not a file")
    from nemotron_core.io_utils import check_not_replacing

    check_not_replacing(output, model, data, eval_data)


class _OutputGuard:
    """Keeps what the user had at ``--output`` safe while a run writes there (see the module docstring).

    ``set_aside()`` (``--force``) renames an existing output to a hidden sibling; ``checkpoint_saved``
    (train's ``on_checkpoint``) and ``succeeded`` delete it; ``failed`` undoes what a run without a
    completed checkpoint created and puts the old output back."""

    def __init__(self, output: Path, resume: bool) -> None:
        self.output = output
        self.resume = resume
        self.backup: Path | None = None
        self.existed = output.exists()  # (without --force) an empty directory the user made: never removed
        self.saved: Path | None = None  # the newest checkpoint this run completed

    def set_aside(self) -> None:
        if not (self.output.exists() or self.output.is_symlink()):
            return
        from nemotron_core.io_utils import set_aside

        self.backup, self.existed = set_aside(self.output, "replaced"), False

    def checkpoint_saved(self, path: Path) -> None:
        self.saved = path
        self._drop_backup()  # the new run can now be resumed: it no longer needs the old output

    def succeeded(self) -> None:
        self._drop_backup()

    def failed(self) -> str:
        """Clean up after a failed or interrupted run; returns a note for the error line ("" if none)."""
        from nemotron_core.training import CHECKPOINTS_DIR, METRICS_NAME, list_checkpoints

        if self.saved is not None:
            return f"kept {self.saved} (--resume continues from it)"
        if self.resume or list_checkpoints(self.output):
            return ""
        note = ""
        if not self.existed:
            if self.output.is_dir() and not self.output.is_symlink():
                shutil.rmtree(self.output, ignore_errors=True)
                note = f"the incomplete {self.output} was removed"
        else:  # it was empty before the run: take out only what the run wrote
            shutil.rmtree(self.output / CHECKPOINTS_DIR, ignore_errors=True)
            (self.output / METRICS_NAME).unlink(missing_ok=True)
        if self.backup is not None:
            try:
                os.replace(self.backup, self.output)
                note = f"the previous {self.output} is back in place"
            except OSError as e:
                note = f"the previous {self.output} is at {self.backup} ({e.strerror or e})"
            self.backup = None
        return note

    def _drop_backup(self) -> None:
        if self.backup is not None:
            from nemotron_core.io_utils import remove_path

            remove_path(self.backup)
            self.backup = None


def _with_note(e: BaseException, note: str) -> BaseException:
    """``e`` with ``note`` added to its one-line error (same exit code); ``e`` itself when there is none."""
    if not note:
        return e
    if isinstance(e, NemotronError):
        new = NemotronError(f"{e}; {note}")
        new.exit_code = e.exit_code
        return new
    msg = " ".join(str(e).split())
    return NemotronError(f"{type(e).__name__}: {msg}; {note}" if msg else f"{type(e).__name__}; {note}")


def _log_line(m: dict[str, Any]) -> str:
    parts = [f"step {m['step']}/{m['total_steps']}", f"epoch {m['epoch']:.2f}",
             f"loss {m['loss']:.4f}" if m["loss"] is not None else "loss -", f"lr {m['lr']:.2e}",
             f"grad norm {m['grad_norm']:.3f}"]
    if m.get("tokens_per_s") is not None:
        parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    if "eval_loss" in m:
        parts.append(f"eval loss {m['eval_loss']:.4f}")
    return " | ".join(parts)


def finetune(
    model: Annotated[Path, typer.Argument(help="Base model directory (Hugging Face layout, with a tokenizer).",
                                          show_default=False)],
    data: Annotated[Path, typer.Option("--data", "-d", help="Training data: JSON Lines with text, prompt + completion, "
                                                            "or messages per line.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory (new or empty, unless --force or "
                                                                "--resume).", show_default=False)],
    eval_data: Annotated[Optional[Path], typer.Option("--eval-data", help="Evaluation data (same format); its loss "
                                                                          "is reported.")] = None,
    use_lora: Annotated[bool, typer.Option("--lora/--full", help="Train a LoRA adapter, or every parameter.")] = True,
    lora_r: Annotated[int, typer.Option("--lora-r", help="LoRA rank (at most the narrowest targeted "
                                                             "layer's min(in, out) features).")] = 8,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha", help="LoRA alpha (scaling = alpha / r).")] = 16,
    lora_targets: Annotated[str, typer.Option("--lora-targets", help="Comma-separated module names to adapt, or "
                                                                     "all-linear.")] = DEFAULT_TARGETS,
    merge: Annotated[bool, typer.Option("--merge", help="LoRA: also write merged/, the base with the adapter folded "
                                                        "in.")] = False,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate. [default: 2e-4 LoRA, 2e-5 full]")] = None,
    schedule: Annotated[str, typer.Option("--schedule", help="LR decay after warmup: cosine, linear or constant.",
                                          autocompletion=lambda: list(SCHEDULES))] = "cosine",
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warmup steps.")] = 0,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps to train (instead of --epochs).",
                                                 show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Passes over the data. [default: 1]",
                                                  show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Examples per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
    max_length: Annotated[int, typer.Option("--max-length", help="Longest example in tokens (longer ones are "
                                                                 "truncated).")] = 2048,
    pack: Annotated[bool, typer.Option("--pack", help="Pack examples into rows (THD batches, no padding).")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing",
                                                         help="Recompute activations in the backward (less memory).")] = False,
    save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps (0: only at the end).")] = 0,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate every N steps (0: only at the end).")] = 0,
    log_every: Annotated[int, typer.Option("--log-every", help="Log every N steps.")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (data order, LoRA init).")] = 0,
    device: DeviceOpt = "auto",
    dtype: Annotated[Optional[DType], typer.Option("--dtype", case_sensitive=False,
                                                   help="Compute dtype: bf16 or fp32. [default: bf16 on CUDA, fp32 on CPU]")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its newest checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing, non-empty --output (set aside until "
                                                           "the new run's first checkpoint).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="JSON Lines on stdout: a log event per log step and a done "
                                                          "event; see above.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a model on JSON Lines data: a LoRA adapter (default) or every parameter (`--full`).

    `--data` holds one example per line: `{"text": ...}`, `{"prompt": ..., "completion": ...}` (only the
    completion is trained) or `{"messages": [...]}` (chat template, assistant turns trained).
    Train for `--steps` optimizer steps or `--epochs` passes (default one epoch); a step is
    `--batch-size` x `--grad-accum` examples. LR: warmup, then `--schedule` cosine, linear or constant.

    `--output` gets `metrics.jsonl`, `checkpoints/step-N/` (every `--save-every` steps, at the end and
    on Ctrl-C), and `final/` (LoRA: a PEFT adapter; `--full`: a complete model directory) plus
    `merged/` with `--merge`. `--resume` continues from the newest checkpoint exactly as if never
    stopped (resuming a finished run rewrites `final/`; fewer `--steps` than the checkpoint has is an
    error: nothing to do); Ctrl-C saves a checkpoint and exits 130.

    Failures keep what you had: `--force` sets the old output aside and deletes it only once the new
    run has completed its first checkpoint (a failure before that puts it back); a failed run removes
    what it created unless it completed a checkpoint (kept for `--resume`). A NaN/inf loss stops the
    run (exit 1, no final adapter written).

    `--json` prints JSON Lines: per log step `{"event": "log", "step", "total_steps", "epoch", "loss",
    "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}` (+ `eval_loss` when evaluated), then
    `{"event": "done", "output", "final", "merged", "steps", "total_steps", "epoch", "train_loss",
    "eval_loss", "tokens", "resumed_from", "trainable_parameters", "elapsed_s"}`; on Ctrl-C
    `{"event": "interrupted", "step", "checkpoint"}`.
    """
    out = Output(json_mode=json_out, quiet=quiet or json_out)
    mode = "lora" if use_lora else "full"
    # ---- options (before anything heavy) ----
    if steps is not None and epochs is not None:
        raise InputError("--steps and --epochs cannot be used together")
    if resume and force:
        raise InputError("--resume and --force cannot be used together (--resume continues the run in --output)")
    if merge and not use_lora:
        raise InputError("--merge applies to LoRA (--full already writes a complete model)")
    if max_length < 2:
        raise InputError(f"--max-length must be at least 2, got {max_length}")
    if dtype is DType.fp16:
        raise InputError("--dtype fp16 is not supported for training (no loss scaling); use bf16 or fp32")
    targets: list[str] | str = [t.strip() for t in lora_targets.split(",") if t.strip()]
    if use_lora:
        if lora_r < 1:
            raise InputError(f"--lora-r must be at least 1, got {lora_r}")
        if not lora_alpha > 0:
            raise InputError(f"--lora-alpha must be > 0, got {lora_alpha}")
        if not targets:
            raise InputError("--lora-targets is empty")
    if targets == ["all-linear"]:
        targets = "all-linear"

    from nemotron_core.training import TrainConfig

    try:
        cfg = TrainConfig(lr=DEFAULT_LR[mode] if lr is None else lr, schedule=schedule, warmup_steps=warmup_steps,
                          max_steps=steps, epochs=1 if epochs is None else epochs, batch_size=batch_size,
                          grad_accum=grad_accum, pack=pack, seed=seed, gradient_checkpointing=gradient_checkpointing,
                          log_every=log_every, save_every=save_every, eval_every=eval_every,
                          dtype="auto" if dtype is None else dtype.value)
    except InputError as e:
        raise _flag_error(e) from None
    _check_paths(model, data, eval_data, output)

    from nemotron_core.io_utils import check_output_dir
    from nemotron_core.lora import LoraConfig
    from nemotron_core.training import latest_checkpoint, resume_checkpoint

    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=targets) if use_lora else None
    resume_ckpt: Path | None = None
    if resume:
        try:
            resume_ckpt = resume_checkpoint(output, cfg, lora)
        except InputError as e:
            raise InputError(f"--resume: {e}") from None
    else:
        check_output_dir(output, force)
        cwd = Path.cwd().resolve()
        if force and (cwd == output.resolve() or output.resolve() in cwd.parents):
            # It is moved aside, and this process (with every relative path) would move with it.
            raise InputError(f"--output {output} holds the current directory; --force cannot replace it")

    import time

    import torch
    from rich.markup import escape

    from nemotron_core.checkpoint import stored_dtype, weight_files
    from nemotron_core.data import load_examples, make_batches
    from nemotron_core.dtypes import dtype_name
    from nemotron_core.lora import find_targets, rank_limit
    from nemotron_core.modeling.model import NemotronHForCausalLM
    from nemotron_core.training import check_resume_target, epoch_batches, plan_steps, train

    dev = resolve_device(device)
    compute = "bf16" if (cfg.dtype == "bf16" or (cfg.dtype == "auto" and dev.type == "cuda")) else "fp32"
    t0 = time.perf_counter()
    with out.working(f"loading {model} ..."):
        tok = load_tokenizer(model)
        examples = load_examples(data, tok, max_length)
        eval_examples = load_examples(eval_data, tok, max_length) if eval_data is not None else None
        pad_id = next((int(v) for v in (tok.pad_token_id, tok.eos_token_id) if v is not None), 0)
        batches_fn = epoch_batches(examples, cfg, pad_id)
        try:  # before the model loads: these need only the data
            total = plan_steps(cfg, batches_fn)
            if resume_ckpt is not None:
                check_resume_target(resume_ckpt, cfg, total)
        except InputError as e:
            raise _flag_error(e) from None
        stored = stored_dtype(weight_files(model))
        # A frozen LoRA base may live in the compute dtype; trained weights stay fp32 (master weights).
        param_dtype = torch.bfloat16 if (use_lora and compute == "bf16") else torch.float32
        lm = NemotronHForCausalLM.from_pretrained(model, dtype=param_dtype, device=dev)
    if lora is not None:
        names = find_targets(lm, lora)
        modules = len(names)
        limit, narrowest = rank_limit(lm, names)
        if lora_r > limit:  # a larger rank cannot help; it only costs memory and disk (GBs for an absurd r)
            raise InputError(f"--lora-r {lora_r} exceeds the rank {narrowest} can use (min(in_features, "
                             f"out_features) = {limit}); use --lora-r {limit} or less")
    cfg.save_dtype = dtype_name(stored)
    eval_batches = None
    if eval_examples is not None:
        eval_batches = make_batches(eval_examples, cfg.batch_size, pack=cfg.pack, max_tokens=cfg.max_tokens,
                                    shuffle=False, seed=cfg.seed, pad_id=pad_id)
    guard = _OutputGuard(output, resume=resume)
    if force:
        guard.set_aside()  # deleted after the new run's first checkpoint; put back if it fails before

    # Only now, so that bad input still fails with exactly one line on stderr.
    what = f"LoRA r={lora_r} alpha={lora_alpha:g} on {modules} modules" if lora is not None else "full fine-tune"
    evals = f", {len(eval_examples)} eval examples" if eval_examples is not None else ""
    out.info(escape(f"loaded {model} on {dev} ({compute} compute) in {time.perf_counter() - t0:.1f} s; {what}; "
                    f"{len(examples)} training examples{evals}; {total} steps"))

    def on_log(m: dict[str, Any]) -> None:
        if json_out:
            out.emit_line({"event": "log", **m})
        else:
            out.info(escape(_log_line(m)))

    try:
        report = train(lm, batches_fn, cfg, output, lora=lora, eval_batches=eval_batches, on_log=on_log,
                       resume=resume, merge=merge, base_dir=model, on_checkpoint=guard.checkpoint_saved)
    except KeyboardInterrupt:
        guard.failed()
        ckpt = latest_checkpoint(output)
        step = int(ckpt.name.split("-")[1]) if ckpt is not None else None
        if json_out:
            out.emit_line({"event": "interrupted", "step": step, "checkpoint": str(ckpt) if ckpt else None})
        elif ckpt is not None:
            out.info(escape(f"newest checkpoint: {ckpt}; continue with the same command plus --resume"))
        raise
    except BaseException as e:
        note = guard.failed()
        if isinstance(e, InputError):
            raise _with_note(_flag_error(e), note) from None
        if not note:
            raise
        raise _with_note(e, note) from e
    guard.succeeded()

    if json_out:
        out.emit_line({"event": "done", **report})
        return
    losses = f"train loss {report['train_loss']:.4f}" if report["train_loss"] is not None else "no steps run"
    if report["eval_loss"] is not None:
        losses += f", eval loss {report['eval_loss']:.4f}"
    resumed = f" (resumed from step {report['resumed_from']})" if report["resumed_from"] is not None else ""
    if report["resumed_from"] == report["steps"]:  # the checkpoint already had every step asked for
        out.info(escape(f"nothing to train: {output} is already at step {report['steps']} of "
                        f"{report['total_steps']}; final/ rewritten from its newest checkpoint"))
    else:
        out.info(escape(f"done: {report['steps']} steps{resumed} in {report['elapsed_s']:.1f} s; {losses}"))
    out.info(escape(f"final: {report['final']} ({'PEFT adapter' if use_lora else 'model directory'})"))
    if report["merged"]:
        out.info(escape(f"merged: {report['merged']}"))


def register(app: typer.Typer) -> None:
    app.command("finetune", epilog=example_epilog(
        "nemotron finetune ./model --data train.jsonl --output runs/lora --steps 200 --warmup-steps 20",
        "nemotron finetune ./model -d train.jsonl --eval-data dev.jsonl -o runs/lora --epochs 3 --merge",
        "nemotron finetune ./model -d train.jsonl -o runs/full --full --lr 1e-5 --grad-accum 4 --pack",
        "nemotron finetune ./model -d train.jsonl -o runs/lora --steps 200 --resume",
        "nemotron finetune ./model -d train.jsonl -o runs/lora --steps 50 --json | jq -c 'select(.event == \"log\")'",
    ))(cli_command(finetune))
