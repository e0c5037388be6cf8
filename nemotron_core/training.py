"""Single-process fine-tuning: AdamW, LR schedule, gradient accumulation, checkpoints, exact resume.

    cfg = TrainConfig(lr=1e-4, max_steps=200, batch_size=8, grad_accum=4)
    report = train(model, epoch_batches(examples, cfg), cfg, "runs/my-lora", lora=LoraConfig(r=8, ...))

Why a plain PyTorch loop and not accelerate or ``transformers.Trainer``: our model is an ``nn.Module``
that speaks transformers' forward protocol but is not a ``PreTrainedModel`` (Trainer's saving, loading
and PEFT paths assume one), and two things this loop must do exactly are awkward to get from them:
resume that reproduces an uninterrupted run bit for bit (same batches in the same order, same
optimizer and RNG state, same log windows) and THD (packed, ``cu_seqlens``) batches with a loss
normalised by the trained tokens of the whole accumulation window. The loop is short enough to read.

The loop. Each epoch's batches come from ``train_batches_fn(epoch)`` (``epoch_batches`` calls
``data.make_batches(..., seed=cfg.seed + epoch)``, so the order is a function of the seed). Consecutive
``grad_accum`` batches form one optimizer step (the last window of an epoch may be shorter; windows
never cross epochs). Every micro-batch's forward gets ``num_items_in_batch`` = the trained tokens of
the whole window, so the summed losses are the window's token mean and the gradient equals that of
one big batch. Gradients are clipped to ``max_grad_norm`` (0 = no clipping), the LR is set from
``lr_at`` before each step. On CUDA (``dtype="auto"``) the forward runs in bf16: under autocast when
the weights are fp32 (full fine-tuning keeps fp32 master weights), natively when they are already bf16
(a frozen LoRA base; the adapters stay fp32). AdamW is fused there; on the CPU everything is fp32.

``step`` counts optimizer steps; ``lr_at(s, ...)`` is the LR of the update that makes step ``s + 1``.
Training stops after ``max_steps`` steps, or after ``epochs`` epochs when ``max_steps`` is None.

Output directory::

    out_dir/metrics.jsonl              one JSON object per log step (the dicts on_log receives)
    out_dir/checkpoints/step-N/        every save_every steps, at the end, and on Ctrl-C
        adapter_config.json + adapter_model.safetensors  (LoRA)  |  config.json + *.safetensors (full)
        optimizer.pt                   AdamW state (torch.save of tensors and numbers only)
        rng_state.pt                   torch / CUDA / numpy / Python RNG states, as tensors
        trainer_state.json             step, epoch, batch index, log accumulators, the config
    out_dir/final/                     LoRA: the PEFT adapter | full: a complete model directory
    out_dir/merged/                    LoRA with merge=True: base + adapter as a full model directory

A checkpoint is written to a temporary sibling and renamed, so ``step-N`` exists only when complete;
only the ``keep_last`` newest are kept. ``.pt`` files are read with ``torch.load(weights_only=True)``:
nothing is ever unpickled. ``resume=True`` continues from the newest checkpoint so that stopping at
step k and resuming gives the same loss curve and final weights as running straight through.
Ctrl-C saves a checkpoint of the last completed step (the optimizer step itself is never cut in half:
SIGINT is held back while it runs) and re-raises ``KeyboardInterrupt``.

Failures. A non-finite loss or gradient norm stops the run before that step's update
(``TrainingDivergedError``, exit code 1): no checkpoint or final artifact is written from non-finite
weights; earlier checkpoints stay. A failed write (disk full, file size limit, permissions) is an
``OutputWriteError`` naming the path and the reason. Resuming with fewer steps than the checkpoint
already has is an InputError (there is nothing to do); resuming a finished run rewrites ``final/``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import MAX_SEED, InputError, NemotronError, OutputExistsError
from .io_utils import atomic_output_dir, check_output_dir
from .lora import LoraConfig

SCHEDULES = ("cosine", "linear", "constant")
COMPUTE_DTYPES = ("auto", "bf16", "fp32")
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
MERGED_DIR = "merged"
METRICS_NAME = "metrics.jsonl"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
RNG_NAME = "rng_state.pt"
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Options whose change would make a resumed run differ from the one it continues (data order,
# what a step is, what is trained).
_RESUME_KEYS = ("batch_size", "grad_accum", "pack", "max_tokens", "seed")
_FP32_MAX = torch.finfo(torch.float32).max

Batch = dict[str, Any]


class TrainingDivergedError(NemotronError):
    """The loss or the gradient norm became NaN/inf (a runtime failure, exit code 1)."""


class OutputWriteError(NemotronError):
    """Writing part of the run's output failed: disk full, file size limit, permissions (exit code 1)."""


# ---- configuration --------------------------------------------------------------------------------------------
def _invalid(name: str, detail: str) -> InputError:
    """An InputError about one config field; ``field``/``detail`` let the CLI name its own flag."""
    err = InputError(f"{name} {detail}")
    err.field = name  # type: ignore[attr-defined]
    err.detail = detail  # type: ignore[attr-defined]
    return err


@dataclass
class TrainConfig:
    """Options of ``train``. ``validate()`` refuses impossible values with a one-line InputError.

    ``max_steps`` counts optimizer steps (None: run ``epochs`` epochs). ``dtype`` is the compute dtype:
    ``auto`` = bf16 on CUDA, fp32 on the CPU; ``bf16`` (autocast over fp32 weights, native over bf16
    ones); ``fp32`` (no autocast). ``save_every``
    0 = checkpoint only at the end; ``eval_every`` 0 = evaluate only at the end; ``keep_last`` 0 =
    keep every checkpoint; ``max_grad_norm`` 0 = no clipping. ``save_dtype``: dtype of the final
    full model (None = the parameters' own)."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    max_steps: int | None = None
    epochs: int = 1
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    batch_size: int = 8
    pack: bool = False
    max_tokens: int | None = None
    seed: int = 0
    gradient_checkpointing: bool = False
    log_every: int = 10
    save_every: int = 0
    eval_every: int = 0
    keep_last: int = 2
    dtype: str = "auto"
    save_dtype: str | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # JSON gives a list back
        self.validate()

    def validate(self) -> None:
        def number(name: str, integer: bool = False) -> float:
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or (not integer and not math.isfinite(v)):
                raise _invalid(name, f"must be {'an integer' if integer else 'a finite number'}, got {v!r}")
            return v

        if number("lr") <= 0:
            raise _invalid("lr", f"must be > 0, got {self.lr}")
        if self.lr > _FP32_MAX:  # AdamW turns it into an fp32 scalar: beyond this it fails inside torch
            raise _invalid("lr", f"must be at most {_FP32_MAX:.4g}, got {self.lr:g}")
        if number("weight_decay") < 0:
            raise _invalid("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise _invalid("betas", f"must be two numbers in [0, 1), got {list(self.betas)}")
        if number("eps") <= 0:
            raise _invalid("eps", f"must be > 0, got {self.eps}")
        if number("warmup_steps", True) < 0:
            raise _invalid("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.max_steps is not None:
            if number("max_steps", True) < 1:
                raise _invalid("max_steps", f"must be at least 1, got {self.max_steps}")
            if self.warmup_steps > self.max_steps:
                raise _invalid("warmup_steps", f"({self.warmup_steps}) must not exceed the number of steps "
                                               f"({self.max_steps})")
        if number("epochs", True) < 1:
            raise _invalid("epochs", f"must be at least 1, got {self.epochs}")
        if self.schedule not in SCHEDULES:
            raise _invalid("schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= number("min_lr_ratio") <= 1:
            raise _invalid("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("grad_accum", "batch_size", "log_every"):
            if number(name, True) < 1:
                raise _invalid(name, f"must be at least 1, got {getattr(self, name)}")
        if number("max_grad_norm") < 0:
            raise _invalid("max_grad_norm", f"must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if self.max_tokens is not None and number("max_tokens", True) < 1:
            raise _invalid("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if not 0 <= number("seed", True) <= MAX_SEED:
            raise _invalid("seed", f"must be in [0, {MAX_SEED}], got {self.seed}")
        for name in ("save_every", "eval_every", "keep_last"):
            if number(name, True) < 0:
                raise _invalid(name, f"must be >= 0, got {getattr(self, name)}")
        if self.dtype not in COMPUTE_DTYPES:
            raise _invalid("dtype", f"must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.save_dtype is not None:
            from .dtypes import parse_dtype

            parse_dtype(self.save_dtype)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) out of ``total_steps``.

    Linear warmup ``lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then
    ``constant`` (lr), or a ``cosine`` / ``linear`` decay from lr towards ``min_lr_ratio * lr`` with
    progress ``(step - warmup) / (total - warmup)`` (clamped to [0, 1], so steps past the end stay at
    the floor)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    floor = cfg.min_lr_ratio * cfg.lr
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)))
    if cfg.schedule == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1.0 - progress)
    raise _invalid("schedule", f"must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")


def epoch_batches(examples: Sequence[Any], cfg: TrainConfig, pad_id: int = 0) -> Callable[[int], list[Batch]]:
    """``train_batches_fn`` over ``examples``: epoch ``e`` is ``make_batches(..., seed=cfg.seed + e)``."""
    from .data import make_batches

    def batches(epoch: int) -> list[Batch]:
        return make_batches(examples, cfg.batch_size, pack=cfg.pack, max_tokens=cfg.max_tokens, shuffle=True,
                            seed=cfg.seed + epoch, pad_id=pad_id)

    return batches


# ---- checkpoints on disk --------------------------------------------------------------------------------------
def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out_dir/checkpoints`` as (step, path), oldest first."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            found.append((int(m[1]), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _read_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE_NAME
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable trainer state ({e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InputError(f"{path}: not a trainer state this version writes (format {STATE_FORMAT})")
    return state


def _torch_load(path: Path, device: torch.device | str = "cpu") -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: missing from the checkpoint") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file or an object weights_only refuses
        raise InputError(f"{path}: cannot read ({' '.join(str(e).split())[:200]})") from None


# ---- RNG state (tensors and plain numbers only, so weights_only loading works) -------------------------------
def _rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python_version": version,
                             "python_state": torch.tensor(mt, dtype=torch.int64), "python_gauss": gauss}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state.update(numpy_keys=torch.from_numpy(keys.astype("int64")), numpy_pos=int(pos),
                     numpy_has_gauss=int(has_gauss), numpy_cached=float(cached))
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()),
                     state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if "numpy_keys" in state:
        try:
            import numpy as np

            np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype("uint32"), state["numpy_pos"],
                                 state["numpy_has_gauss"], state["numpy_cached"]))
        except ImportError:
            pass


# ---- small helpers --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _sigint_deferred():
    """Hold SIGINT back while the body runs (an optimizer step must not be cut in half), then raise
    KeyboardInterrupt if one came. Only where Python's default handler is installed, in the main thread."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


# What the writers that hide an OSError's errno say: safetensors ("... (os error 28)"), torch's zip
# writer ("[enforce fail at inline_container.cc:...] ... file write failed").
_WRITER_TEXT = re.compile(r"os error (\d+)|file write failed|inline_container|iostream error", re.IGNORECASE)


def _strerror(errno: int) -> str:
    text = os.strerror(errno)
    return text[:1].lower() + text[1:]  # "no space left on device", as part of a sentence


def _write_reason(exc: BaseException, path: Path) -> str | None:
    """Why writing ``path`` failed, in words ("no space left on device", "file too large"), or None when
    ``exc`` is not a write failure. The OSError may be ``exc`` itself or only its cause/context (torch's
    RuntimeError wraps it), or survive only as text (safetensors)."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, OSError):
            return _strerror(e.errno) if e.errno else (" ".join(str(e).split()) or type(e).__name__)
    for e in chain:
        m = _WRITER_TEXT.search(str(e))
        if m and m[1]:
            return _strerror(int(m[1]))
        if m:  # no errno left anywhere: a full disk is the usual cause, and one we can check
            with contextlib.suppress(OSError):
                if shutil.disk_usage(path.parent if path.parent.exists() else ".").free < 2**20:
                    return _strerror(28)  # ENOSPC
            return "the write failed"
    return None


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Report a failed write under ``path`` as one OutputWriteError naming the path and the reason
    (instead of, say, torch's "[enforce fail at inline_container.cc:672] . unexpected pos ...")."""
    try:
        yield
    except NemotronError:
        raise
    except Exception as e:
        reason = _write_reason(e, path)
        if reason is None:
            raise
        raise OutputWriteError(f"cannot write {path}: {reason}") from e


def _torch_save(obj: Any, path: Path) -> None:
    # Through a Python file object: a failed write then keeps its OSError (and errno) as the context of
    # torch's RuntimeError; with a path torch's C++ stream drops it.
    with open(path, "wb") as f:
        torch.save(obj, f)


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when no element is NaN/inf (one host sync for all the tensors)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _diverged(step: int, what: str, lora: LoraConfig | None) -> TrainingDivergedError:
    artifact = "adapter" if lora is not None else "model"
    return TrainingDivergedError(f"training diverged at step {step} ({what}); no final {artifact} written")


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _autocast(model: nn.Module, dtype: str) -> Callable[[], Any]:
    """A context factory: bf16 autocast for ``dtype`` "bf16" (or "auto" on CUDA) over fp32 weights.
    A model whose weights are already bf16/fp16 (a frozen LoRA base) runs natively, as in inference:
    autocast would hand fp32 intermediates (from the ops it runs in fp32, e.g. ``pow``) to ops it does
    not cover, such as the experts' grouped GEMM."""
    device = next(model.parameters()).device
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        if all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point()):
            return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in module order: matrices decay, vectors (norms, biases, A_log, D) do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise InputError("nothing to train: the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _mode(lora: LoraConfig | None) -> str:
    return "lora" if lora is not None else "full"


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch], dtype: str = "auto") -> float:
    """Mean loss per trained token over ``batches`` (model in eval mode for the duration). For a model
    with an MTP head this is the next-token loss alone; the train loss also holds the MTP term."""
    from .data import count_trained_tokens

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    amp = _autocast(model, dtype)
    try:
        for b in batches:
            n = count_trained_tokens(b)
            if n == 0:
                continue
            with amp():
                out = model(**_to_device(b, device), num_items_in_batch=1)  # the sum of token losses
            total += out.loss.double()
            tokens += n
    finally:
        model.train(was_training)
    return float(total / tokens) if tokens else float("nan")


# ---- the loop -------------------------------------------------------------------------------------------------
class _Epochs:
    """``train_batches_fn`` with the last epoch's batches kept (it is asked for the same epoch repeatedly)."""

    def __init__(self, fn: Callable[[int], Sequence[Batch]]) -> None:
        self.fn = fn
        self.epoch: int | None = None
        self.batches: list[Batch] = []

    def __call__(self, epoch: int) -> list[Batch]:
        if epoch != self.epoch:
            self.batches = list(self.fn(epoch))
            self.epoch = epoch
            if not self.batches:
                raise InputError(f"epoch {epoch} has no training batches (is the data set empty?)")
        return self.batches


@dataclass
class _Progress:
    """Everything a checkpoint must restore besides weights, optimizer and RNG."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # next batch of `epoch` to consume
    tokens: int = 0  # trained tokens so far
    log_loss: float = 0.0  # sum over the steps since the last log of (window mean loss x window tokens)
    log_tokens: int = 0
    train_loss: float | None = None  # last logged
    eval_loss: float | None = None  # last evaluated
    pending: dict[str, Any] | None = None  # {"lr", "grad_norm"} of a finished step whose log is not written yet


_PROGRESS_KEYS = tuple(f.name for f in dataclasses.fields(_Progress))


def _total_steps(cfg: TrainConfig, epochs: Callable[[int], Sequence[Batch]]) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    total = sum(math.ceil(len(epochs(e)) / cfg.grad_accum) for e in range(cfg.epochs))
    if cfg.warmup_steps > total:
        raise _invalid("warmup_steps", f"({cfg.warmup_steps}) must not exceed the number of steps ({total} for "
                                       f"{cfg.epochs} epoch(s))")
    return total


def plan_steps(cfg: TrainConfig, train_batches_fn: Callable[[int], Sequence[Batch]]) -> int:
    """The number of optimizer steps ``train`` will take (``max_steps``, or the steps of ``epochs``
    epochs); an InputError when the warmup is longer or an epoch has no batches."""
    cfg.validate()
    return _total_steps(cfg, _Epochs(train_batches_fn))


def resume_checkpoint(out_dir: str | Path, cfg: TrainConfig, lora: LoraConfig | None) -> Path:
    """The checkpoint ``train(..., resume=True)`` would continue from: the newest complete one, checked
    to be a run of the same kind with the same data order (one-line InputError otherwise)."""
    out = Path(out_dir)
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise InputError(f"{out}: no checkpoint to resume from (expected {out / CHECKPOINTS_DIR}/step-N)")
    state = _read_state(ckpt)
    mode = _mode(lora)
    if state.get("mode") != mode:
        raise InputError(f"cannot resume from {ckpt}: it is a {state.get('mode')} fine-tune, this run is {mode}")
    old = state.get("config", {})
    for key in _RESUME_KEYS:
        if old.get(key) != getattr(cfg, key):
            raise InputError(f"cannot resume from {ckpt}: it was trained with {key}={old.get(key)!r}, this run has "
                             f"{key}={getattr(cfg, key)!r} (use the same options to continue the run exactly)")
    if lora is not None:
        saved = state.get("lora") or {}
        now = lora.to_dict()
        for key in ("r", "lora_alpha", "target_modules", "use_rslora", "exclude_modules"):
            if saved.get(key) != now.get(key):
                raise InputError(f"cannot resume from {ckpt}: its adapter has {key}={saved.get(key)!r}, this run "
                                 f"has {key}={now.get(key)!r}")
    return ckpt


def check_resume_target(ckpt: Path, cfg: TrainConfig, total_steps: int) -> None:
    """Refuse to resume the run of ``ckpt`` to fewer steps than it has already trained: that cannot give
    the shorter run asked for, so there is nothing to do (InputError naming ``max_steps`` or ``epochs``).
    Resuming to exactly the checkpoint's step is allowed: it trains nothing and rewrites ``final/``."""
    step = _read_state(ckpt).get("step")
    if not isinstance(step, int) or step <= total_steps:
        return
    if cfg.max_steps is not None:
        raise _invalid("max_steps", f"is {cfg.max_steps} but the run is already at step {step} ({ckpt}); "
                                    "nothing to do (resume with more steps to train longer)")
    raise _invalid("epochs", f"is {cfg.epochs} ({total_steps} steps) but the run is already at step {step} "
                             f"({ckpt}); nothing to do (resume with more epochs to train longer)")


def train(model: nn.Module, train_batches_fn: Callable[[int], Sequence[Batch]], cfg: TrainConfig,
          out_dir: str | Path, lora: LoraConfig | None = None, eval_batches: Sequence[Batch] | None = None,
          on_log: Callable[[dict[str, Any]], None] | None = None, resume: bool = False, merge: bool = False,
          base_dir: str | Path | None = None,
          on_checkpoint: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place (LoRA when ``lora`` is given, else every parameter) and write
    checkpoints, ``metrics.jsonl`` and the final artifact under ``out_dir`` (see the module docstring).

    ``train_batches_fn(epoch)`` returns that epoch's batches (forward kwargs with ``labels``).
    ``on_log`` receives a dict per log step: ``step, total_steps, epoch, loss, lr, grad_norm, tokens,
    tokens_per_s, elapsed_s`` (+ ``eval_loss`` when evaluated at that step). ``merge`` (LoRA only)
    also writes ``out_dir/merged``, a full model with the adapter folded in; the model is left merged.
    ``base_dir``: the model directory the weights came from; its tokenizer and generation files are
    copied into full model outputs. ``on_checkpoint(path)`` is called after each checkpoint is complete
    (the CLI drops the output that ``--force`` set aside once the new run has one). Raises
    ``TrainingDivergedError`` at the first non-finite loss or gradient norm (before that step's update)
    and ``OutputWriteError`` when writing fails. Returns ``output, final, merged, steps, total_steps, epoch,
    train_loss, eval_loss, tokens, resumed_from, trainable_parameters, elapsed_s``."""
    from .data import count_trained_tokens

    cfg.validate()
    out = Path(out_dir)
    if merge and lora is None:
        raise InputError("merge applies to LoRA fine-tunes only (a full fine-tune already writes a full model)")
    ckpt: Path | None = None
    state: dict[str, Any] | None = None
    if resume:
        ckpt = resume_checkpoint(out, cfg, lora)
        state = _read_state(ckpt)
    else:
        try:
            check_output_dir(out, force=False)
        except OutputExistsError:
            raise OutputExistsError(f"{out} exists and is not empty; resume the run there or choose a new "
                                    "directory") from None
    device = next(model.parameters()).device
    t_start = time.perf_counter()
    epochs = _Epochs(train_batches_fn)
    total = _total_steps(cfg, epochs)
    if ckpt is not None:
        check_resume_target(ckpt, cfg, total)

    # -- what is trained --------------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # LoRA's A init; the RNG state of a resumed run comes from its checkpoint
    random.seed(cfg.seed)
    enabled_checkpointing = False
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
        enabled_checkpointing = True
    if lora is not None:
        from .lora import apply_lora, load_adapter, mark_only_lora_trainable

        if ckpt is not None:
            load_adapter(model, ckpt)
        else:
            apply_lora(model, lora)
        mark_only_lora_trainable(model)
    else:
        if ckpt is not None:
            from .checkpoint import load_weights, weight_files

            load_weights(model, weight_files(ckpt))
        for p in model.parameters():
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  fused=True if device.type == "cuda" else None)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    prog = _Progress()
    rng_after_step = _rng_state()  # the RNG state a checkpoint of the last finished step holds
    if ckpt is not None and state is not None:
        optimizer.load_state_dict(_torch_load(ckpt / OPTIMIZER_NAME, device))
        rng_after_step = _torch_load(ckpt / RNG_NAME)
        _set_rng_state(rng_after_step)
        prog = _Progress(**{k: state[k] for k in _PROGRESS_KEYS})
    resumed_from = prog.step if ckpt is not None else None
    metrics_path = out / METRICS_NAME
    with _writing(metrics_path):
        out.mkdir(parents=True, exist_ok=True)
        _prepare_metrics(metrics_path, prog.step if ckpt is not None else None)
    for tmp in (out / CHECKPOINTS_DIR).glob(".step-*"):  # left by a killed (not interrupted) run
        shutil.rmtree(tmp, ignore_errors=True)

    def save_checkpoint(rng: dict[str, Any]) -> Path:
        path = out / CHECKPOINTS_DIR / f"step-{prog.step}"
        if not _all_finite(trainable):  # the last update overflowed: such a checkpoint cannot be resumed
            raise _diverged(prog.step, "non-finite weights", lora)
        with _writing(path), atomic_output_dir(path, force=True) as tmp:
            if lora is not None:
                from .lora import save_adapter

                save_adapter(model, tmp, _with_base(lora, base_dir))
            else:
                model.save_pretrained(str(tmp))
            _torch_save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
            _torch_save(rng, tmp / RNG_NAME)
            body = {"format": STATE_FORMAT, "mode": _mode(lora), "total_steps": total,
                    **{k: getattr(prog, k) for k in _PROGRESS_KEYS},
                    "config": cfg.to_dict(), "lora": lora.to_dict() if lora is not None else None}
            (tmp / STATE_NAME).write_text(json.dumps(body, indent=2) + "\n")
        if cfg.keep_last > 0:
            for _, old in list_checkpoints(out)[:-cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        if on_checkpoint is not None:
            on_checkpoint(path)
        return path

    model.train()
    last_saved = prog.step  # a fresh run has nothing to save at step 0 (save_every divides 0)
    loss_acc = torch.tensor(prog.log_loss, dtype=torch.float64, device=device)  # on the device: no sync per step
    clock = {"t": time.perf_counter(), "tokens": prog.tokens}  # at the last log line
    amp = _autocast(model, cfg.dtype)

    def done() -> bool:
        return prog.step >= total or (cfg.max_steps is None and prog.epoch >= cfg.epochs)

    def wants_eval() -> bool:
        return eval_batches is not None and (done() or (cfg.eval_every > 0 and prog.step % cfg.eval_every == 0))

    def epoch_progress() -> float:
        return round(prog.epoch + (prog.batch_index / len(epochs(prog.epoch)) if prog.batch_index else 0), 4)

    def log(evaluated: bool) -> None:
        assert prog.pending is not None
        now = time.perf_counter()
        loss = float(loss_acc) / prog.log_tokens if prog.log_tokens else prog.train_loss
        since, tokens_since = now - clock["t"], prog.tokens - clock["tokens"]
        record: dict[str, Any] = {
            "step": prog.step, "total_steps": total, "epoch": epoch_progress(),
            "loss": loss, "lr": prog.pending["lr"], "grad_norm": prog.pending["grad_norm"], "tokens": prog.tokens,
            "tokens_per_s": round(tokens_since / since, 2) if since > 0 else None,
            "elapsed_s": round(now - t_start, 3)}
        if evaluated:
            record["eval_loss"] = prog.eval_loss
        prog.train_loss, prog.pending, prog.log_tokens = loss, None, 0
        loss_acc.zero_()
        clock.update(t=now, tokens=prog.tokens)
        with _writing(metrics_path), metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if on_log is not None:
            on_log(record)

    def after_step() -> None:
        """Evaluate, log and save as the finished step asks. Evaluation may be interrupted (the step's
        log stays pending in the checkpoint and is redone on resume); logging and saving are not."""
        nonlocal last_saved
        if prog.pending is not None:
            evaluated = wants_eval()
            if evaluated:
                prog.eval_loss = evaluate(model, eval_batches, cfg.dtype)
            with _sigint_deferred():
                log(evaluated)
        if prog.step != last_saved and (done() or (cfg.save_every > 0 and prog.step % cfg.save_every == 0)):
            with _sigint_deferred():
                prog.log_loss = float(loss_acc)
                save_checkpoint(rng_after_step)
                last_saved = prog.step

    try:
        after_step()  # a resumed checkpoint may hold a step whose log was interrupted
        while not done():
            batches = epochs(prog.epoch)
            window = batches[prog.batch_index:prog.batch_index + cfg.grad_accum]
            n_tokens = sum(int(count_trained_tokens(b)) for b in window)
            lr = lr_at(prog.step, cfg, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            window_loss = torch.zeros((), dtype=torch.float32, device=device)
            for b in window:
                with amp():
                    loss = model(**_to_device(b, device), num_items_in_batch=max(n_tokens, 1)).loss
                loss.backward()
                window_loss += loss.detach().float()
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
            # One host sync per step (the loop otherwise avoids them): a NaN/inf loss or gradient must stop
            # the run before the update carries it into the weights, the checkpoints and final/.
            if not bool(torch.isfinite(window_loss) & torch.isfinite(grad_norm)):
                loss_v, norm_v = float(window_loss), float(grad_norm)
                what = f"loss {loss_v:.4g}" + ("" if not math.isfinite(loss_v) else f", grad norm {norm_v:.4g}")
                raise _diverged(prog.step + 1, what, lora)
            with _sigint_deferred():  # weights, optimizer and progress change together or not at all
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_acc.add_(window_loss.double() * n_tokens)
                prog.step += 1
                prog.batch_index += len(window)
                prog.tokens += n_tokens
                prog.log_tokens += n_tokens
                if prog.batch_index >= len(batches):
                    prog.epoch, prog.batch_index = prog.epoch + 1, 0
                if done() or wants_eval() or prog.step % cfg.log_every == 0:
                    prog.pending = {"lr": lr, "grad_norm": float(grad_norm)}
                rng_after_step = _rng_state()
            after_step()
    except KeyboardInterrupt:
        if prog.step >= 1 and prog.step != last_saved:
            prog.log_loss = float(loss_acc)
            save_checkpoint(rng_after_step)
        raise

    if not _all_finite(trainable):  # the last update overflowed (no later loss to show it)
        raise _diverged(prog.step, "non-finite weights", lora)
    model.eval()
    if enabled_checkpointing:
        model.gradient_checkpointing_disable()
    final, merged = _write_final(model, out, cfg, lora, merge, base_dir)
    return {"output": str(out), "final": str(final), "merged": str(merged) if merged else None,
            "steps": prog.step, "total_steps": total, "epoch": epoch_progress(), "train_loss": prog.train_loss,
            "eval_loss": prog.eval_loss, "tokens": prog.tokens, "resumed_from": resumed_from,
            "trainable_parameters": sum(p.numel() for p in trainable),
            "elapsed_s": round(time.perf_counter() - t_start, 3)}


def _prepare_metrics(path: Path, resumed_step: int | None) -> None:
    """Start metrics.jsonl afresh, or (resume) drop the lines logged after the checkpoint's step:
    the resumed run logs them again."""
    if resumed_step is None or not path.is_file():
        path.write_text("")
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= resumed_step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue
    path.write_text("".join(line + "\n" for line in kept))


def _with_base(lora: LoraConfig, base_dir: str | Path | None) -> LoraConfig:
    return dataclasses.replace(lora, base_model_name_or_path=str(base_dir)) if base_dir is not None else lora


def _write_final(model: nn.Module, out: Path, cfg: TrainConfig, lora: LoraConfig | None, merge: bool,
                 base_dir: str | Path | None) -> tuple[Path, Path | None]:
    from .checkpoint import copy_side_files

    final = out / FINAL_DIR
    with _writing(final), atomic_output_dir(final, force=True) as tmp:
        if lora is not None:
            from .lora import save_adapter

            save_adapter(model, tmp, _with_base(lora, base_dir))
        else:
            model.save_pretrained(str(tmp), dtype=cfg.save_dtype)
            if base_dir is not None:
                copy_side_files(base_dir, tmp)
    if lora is None or not merge:
        return final, None
    from .lora import merge_and_unload

    merged = out / MERGED_DIR
    with _writing(merged), atomic_output_dir(merged, force=True) as tmp:
        merge_and_unload(model)
        model.save_pretrained(str(tmp), dtype=cfg.save_dtype)
        if base_dir is not None:
            copy_side_files(base_dir, tmp)
    return final, merged
