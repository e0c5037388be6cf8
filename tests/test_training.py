"""nemotron_core.training: schedule, config checks, the loop (LoRA and full), gradient accumulation,
checkpoints and exact resume, final artifacts. Tiny preset model, fp32 on the CPU."""
from __future__ import annotations

import errno
import json
import math
import os

import pytest
import torch

from nemotron_core.create import build_config, random_model
from nemotron_core.data import Example, make_batches
from nemotron_core.errors import InputError, OutputExistsError
from nemotron_core.lora import LoraConfig, load_adapter
from nemotron_core.modeling.model import NemotronHForCausalLM
from nemotron_core.training import (
    SCHEDULES,
    OutputWriteError,
    TrainConfig,
    TrainingDivergedError,
    _write_reason,
    epoch_batches,
    latest_checkpoint,
    list_checkpoints,
    lr_at,
    train,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "up_proj", "down_proj"]


def tiny_model(seed: int = 0) -> NemotronHForCausalLM:
    return random_model(build_config("tiny"), torch.float32, seed=seed)


def repetitive(n: int = 8, length: int = 24, vary: bool = False) -> list[Example]:
    """Short cyclic sequences over a few token ids: easy to learn, so the loss must fall fast."""
    out = []
    for i in range(n):
        size = length - (i % 3) * 3 if vary else length
        ids = [10 + (i + t) % 5 for t in range(size)]
        labels = list(ids)
        if vary and i % 2:
            labels[: size // 3] = [-100] * (size // 3)  # a prompt part that is not trained
        out.append(Example(input_ids=ids, labels=labels))
    return out


def lora_cfg(r: int = 8) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=16, target_modules=TARGETS)


def run(tmp_path, name: str, cfg: TrainConfig, examples, lora: LoraConfig | None = None, model=None, **kwargs):
    model = model if model is not None else tiny_model()
    logs: list[dict] = []
    report = train(model, epoch_batches(examples, cfg), cfg, tmp_path / name, lora=lora,
                   on_log=logs.append, **kwargs)
    return model, report, logs


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_params_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# ---- schedule and config ----------------------------------------------------------------------------------------
def test_lr_schedule_values():
    assert SCHEDULES == ("cosine", "linear", "constant")
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 14) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(4, cfg, 14) == pytest.approx(1.0)  # decay starts at the peak
    assert lr_at(9, cfg, 14) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: the cosine midpoint
    assert lr_at(14, cfg, 14) == pytest.approx(0.1) and lr_at(99, cfg, 14) == pytest.approx(0.1)
    lin = TrainConfig(lr=2.0, max_steps=10, schedule="linear")
    assert [lr_at(s, lin, 10) for s in (0, 5, 9)] == pytest.approx([2.0, 1.0, 0.2])
    const = TrainConfig(lr=3e-4, warmup_steps=2, max_steps=10, schedule="constant")
    assert [lr_at(s, const, 10) for s in (0, 1, 2, 9)] == pytest.approx([1.5e-4, 3e-4, 3e-4, 3e-4])
    cos = TrainConfig(lr=1.0, max_steps=8)
    values = [lr_at(s, cos, 8) for s in range(8)]
    assert values == sorted(values, reverse=True) and values[0] == 1.0
    assert values[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("kwargs, word", [
    ({"lr": 0}, "lr"), ({"lr": -1.0}, "lr"), ({"grad_accum": 0}, "grad_accum"), ({"max_steps": 0}, "max_steps"),
    ({"warmup_steps": 5, "max_steps": 4}, "warmup_steps"), ({"schedule": "step"}, "schedule"),
    ({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"), ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
    ({"max_grad_norm": -1.0}, "max_grad_norm"), ({"dtype": "fp16"}, "dtype"), ({"lr": float("nan")}, "lr"),
])
def test_impossible_config_values(kwargs, word):
    with pytest.raises(InputError) as e:
        TrainConfig(**kwargs)
    assert word in str(e.value) and "\n" not in str(e.value)
    assert e.value.field == word


def test_warmup_longer_than_the_epochs(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=4, warmup_steps=5, seed=0)  # 8 examples -> 2 steps
    with pytest.raises(InputError, match="warmup_steps"):
        run(tmp_path, "w", cfg, repetitive())


# ---- the loop ---------------------------------------------------------------------------------------------------
def test_lora_loss_goes_down(tmp_path):
    """lm_head is adapted too: the random model's frozen lm_head (std 0.02) and final norm cap its
    logits near +-1.3, so adapters inside the blocks alone cannot take the loss below ~5.6."""
    cfg = TrainConfig(lr=1e-2, max_steps=30, batch_size=4, log_every=1, schedule="constant")
    base = tiny_model()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS + ["lm_head"])
    model, report, logs = run(tmp_path, "lora", cfg, repetitive(), lora=lora, model=base)
    assert [m["step"] for m in logs] == list(range(1, 31))
    assert logs[-1]["loss"] < 0.5 * logs[0]["loss"]
    for m in logs:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(m)
    assert report["steps"] == 30 and report["train_loss"] == logs[-1]["loss"]
    assert logs[-1]["tokens"] == 30 * 4 * 23  # 4 examples of 24 tokens, 23 targets each, per step
    assert logs[-1]["epoch"] == pytest.approx(15.0)  # 2 batches per epoch
    # Only the LoRA matrices moved.
    unwrapped = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert_params_close(unwrapped, frozen, atol=0)
    lines = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert lines == logs


def test_full_finetune_loss_goes_down_and_writes_a_model(tmp_path):
    cfg = TrainConfig(lr=3e-3, max_steps=15, batch_size=4, log_every=5, schedule="constant")
    model, report, logs = run(tmp_path, "full", cfg, repetitive())
    assert [m["step"] for m in logs] == [5, 10, 15]
    assert logs[-1]["loss"] < 0.5 * logs[0]["loss"]
    final = tmp_path / "full" / "final"
    assert report["final"] == str(final) and report["merged"] is None
    reloaded = NemotronHForCausalLM.from_pretrained(final)
    assert_params_close(params(reloaded), params(model), atol=0)


def test_grad_accum_equals_one_big_batch(tmp_path):
    """2 micro-batches of 2 then one step == 1 batch of 4 (different lengths and masks: the loss is
    normalised by the trained tokens of the whole window, not per micro-batch)."""
    examples = repetitive(4, vary=True)
    results = []
    for name, bs, accum in (("accum", 2, 2), ("big", 4, 1)):
        cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=bs, grad_accum=accum, log_every=1)
        model, _, logs = run(tmp_path, name, cfg, examples, lora=lora_cfg())
        results.append((params(model), logs[0]))
    (pa, la), (pb, lb) = results
    assert_params_close(pa, pb, atol=1e-6)
    assert la["loss"] == pytest.approx(lb["loss"], abs=1e-6)
    assert la["tokens"] == lb["tokens"]
    # The pre-clip gradient norm is the sharp check (Adam's first step is nearly scale-free): averaging
    # per-micro-batch means would weight the two halves' tokens differently (21 + 24 vs 15 + 18 targets).
    assert la["grad_norm"] == pytest.approx(lb["grad_norm"], rel=1e-5)
    assert any(pa[k].abs().max() > 1e-3 for k in pa if "lora_B" in k)  # the step did move the adapters


# ---- checkpoints and resume --------------------------------------------------------------------------------------
class _Stop:
    """Raise KeyboardInterrupt (as Ctrl-C would) at a chosen moment."""

    def __init__(self, model, forward_calls: int | None = None, at_log_step: int | None = None):
        self.calls, self.forward_calls, self.at_log_step = 0, forward_calls, at_log_step
        if forward_calls is not None:
            model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1
        if self.calls == self.forward_calls:
            raise KeyboardInterrupt

    def on_log(self, logs):
        def f(m):
            logs.append(m)
            if m["step"] == self.at_log_step:
                raise KeyboardInterrupt
        return f


@pytest.mark.parametrize("mode, where", [("lora", "at_log"), ("lora", "mid_window"), ("full", "mid_window")])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, mode, where):
    """THE key test: N steps straight == k steps, Ctrl-C, resume to N (loss curve, lr, grad norms, eval
    losses and final parameters). 10 examples in micro-batches of 2 with accumulation 2 make 3 steps per
    epoch (the last window is one micro-batch), so the run crosses epochs; cosine with warmup; eval and
    save every 3 steps. LoRA runs use dropout, so the RNG state must be restored too; "mid_window" logs
    every 3 steps, so the checkpoint must carry the half-filled log window."""
    examples = repetitive(10, vary=True)
    evals = make_batches(repetitive(4), 2, shuffle=False)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.1) if mode == "lora" else None
    cfg = TrainConfig(lr=5e-3, max_steps=8, warmup_steps=2, batch_size=2, grad_accum=2, eval_every=3,
                      save_every=3, keep_last=2, seed=3, log_every=1 if where == "at_log" else 3)
    straight, report, logs = run(tmp_path, "straight", cfg, examples, lora=lora, eval_batches=evals)

    model = tiny_model()
    cut_logs: list[dict] = []
    # mid_window: in the 2nd micro-batch of step 5. Forward calls: steps 1-3 take 2 + 2 + 1, the eval
    # after step 3 takes 2, step 4 takes 2, then step 5's first and second micro-batches.
    stop = _Stop(model, forward_calls=5 + 2 + 2 + 2) if where == "mid_window" else _Stop(model, at_log_step=4)
    with pytest.raises(KeyboardInterrupt):
        train(model, epoch_batches(examples, cfg), cfg, tmp_path / "cut", lora=lora, eval_batches=evals,
              on_log=stop.on_log(cut_logs))
    assert cut_logs == [m for m in cut_logs if m["step"] <= 4] and cut_logs
    assert latest_checkpoint(tmp_path / "cut").name == "step-4"
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [3, 4]
    assert not (tmp_path / "cut" / "final").exists()

    resumed, report2, rest = run(tmp_path, "cut", cfg, examples, lora=lora, eval_batches=evals, resume=True)
    assert report2["resumed_from"] == 4 and report2["steps"] == 8
    assert [m["step"] for m in cut_logs + rest] == [m["step"] for m in logs]
    assert [m["step"] for m in logs] == ([1, 2, 3, 4, 5, 6, 7, 8] if where == "at_log" else [3, 6, 8])
    for a, b in zip(logs, cut_logs + rest):
        for key in ("step", "epoch", "lr", "tokens"):
            assert a[key] == b[key], (key, a, b)
        for key in ("loss", "grad_norm", "eval_loss"):
            assert (a.get(key) is None) == (b.get(key) is None)
            if a.get(key) is not None:
                assert a[key] == pytest.approx(b[key], abs=1e-6), (key, a, b)
    assert report["train_loss"] == pytest.approx(report2["train_loss"], abs=1e-6)
    assert report["eval_loss"] == pytest.approx(report2["eval_loss"], abs=1e-6)
    assert_params_close(params(straight), params(resumed), atol=1e-6)
    metrics = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [m["step"] for m in logs]
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [6, 8]  # keep_last=2
    assert not list((tmp_path / "cut" / "checkpoints").glob(".*"))  # no temporary leftovers


def test_resume_checks(tmp_path):
    examples = repetitive()
    cfg = TrainConfig(lr=1e-3, max_steps=2, batch_size=4, log_every=1)
    with pytest.raises(InputError, match="no checkpoint"):
        run(tmp_path, "none", cfg, examples, lora=lora_cfg(), resume=True)
    run(tmp_path, "done", cfg, examples, lora=lora_cfg())
    with pytest.raises(OutputExistsError):
        run(tmp_path, "done", cfg, examples, lora=lora_cfg())
    other = TrainConfig(lr=1e-3, max_steps=2, batch_size=2, log_every=1)
    with pytest.raises(InputError, match="batch_size"):
        run(tmp_path, "done", other, examples, lora=lora_cfg(), resume=True)
    with pytest.raises(InputError, match="lora fine-tune"):
        run(tmp_path, "done", cfg, examples, resume=True)
    with pytest.raises(InputError, match="r="):
        run(tmp_path, "done", cfg, examples, lora=lora_cfg(r=4), resume=True)
    # Resuming to fewer steps than the checkpoint has: nothing to do (it cannot make the run shorter).
    fewer = TrainConfig(lr=1e-3, max_steps=1, batch_size=4, log_every=1)
    with pytest.raises(InputError, match="is 1 but the run is already at step 2") as e:
        run(tmp_path, "done", fewer, examples, lora=lora_cfg(), resume=True)
    assert e.value.field == "max_steps"
    # Resuming a finished run trains nothing and rewrites final/; raising --steps trains on.
    _, report, logs = run(tmp_path, "done", cfg, examples, lora=lora_cfg(), resume=True)
    assert report["steps"] == 2 and logs == [] and report["train_loss"] is not None
    longer = TrainConfig(lr=1e-3, max_steps=4, batch_size=4, log_every=1)
    _, report, logs = run(tmp_path, "done", longer, examples, lora=lora_cfg(), resume=True)
    assert report["steps"] == 4 and [m["step"] for m in logs] == [3, 4]


def test_checkpoint_files_load_without_unpickling(tmp_path):
    cfg = TrainConfig(lr=1e-3, max_steps=2, batch_size=4)
    run(tmp_path, "ck", cfg, repetitive(), lora=lora_cfg())
    ckpt = latest_checkpoint(tmp_path / "ck")
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pt",
            "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    for name in ("optimizer.pt", "rng_state.pt"):
        torch.load(ckpt / name, weights_only=True)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["mode"] == "lora" and state["config"]["batch_size"] == 4


def test_checkpoints_every_step_start_at_step_1(tmp_path):
    """save_every divides 0 too: a fresh run used to write a worthless step-0 checkpoint first."""
    cfg = TrainConfig(lr=1e-3, max_steps=2, batch_size=4, save_every=1, keep_last=0)
    saved: list = []
    run(tmp_path, "ck", cfg, repetitive(), lora=lora_cfg(), on_checkpoint=saved.append)
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [1, 2]
    assert saved == [tmp_path / "ck" / "checkpoints" / "step-1", tmp_path / "ck" / "checkpoints" / "step-2"]


# ---- failures ---------------------------------------------------------------------------------------------------
def test_divergence_stops_before_the_update_and_writes_no_final(tmp_path):
    """lr 1e30: step 1's loss is finite (its update is huge), step 2's is NaN: stop there (exit code 1),
    keep the finite step-1 checkpoint, write no final adapter and no checkpoint of the NaN step."""
    cfg = TrainConfig(lr=1e30, max_steps=4, batch_size=4, save_every=1, log_every=1)
    logs: list[dict] = []
    with pytest.raises(TrainingDivergedError, match=r"^training diverged at step 2 \(loss nan\); no final adapter "
                                                    r"written$") as e:
        train(tiny_model(), epoch_batches(repetitive(), cfg), cfg, tmp_path / "d", lora=lora_cfg(), on_log=logs.append)
    assert e.value.exit_code == 1
    assert [m["step"] for m in logs] == [1] and math.isfinite(logs[0]["loss"])
    assert [s for s, _ in list_checkpoints(tmp_path / "d")] == [1] and not (tmp_path / "d" / "final").exists()


def test_non_finite_weights_after_the_last_step_write_no_final(tmp_path):
    """An update that overflows on the last step shows in no later loss: the weights are checked before
    the checkpoint and final/ are written (here poisoned from the step's log callback, which runs first)."""
    model = tiny_model()
    cfg = TrainConfig(lr=1e-3, max_steps=1, batch_size=4, log_every=1)

    def poison(m):
        next(p for n, p in model.named_parameters() if "lora_B" in n).data[0, 0] = math.inf

    with pytest.raises(TrainingDivergedError, match=r"at step 1 \(non-finite weights\); no final adapter written"):
        train(model, epoch_batches(repetitive(), cfg), cfg, tmp_path / "w", lora=lora_cfg(), on_log=poison)
    assert list_checkpoints(tmp_path / "w") == [] and not (tmp_path / "w" / "final").exists()


def test_lr_beyond_fp32_is_refused():
    """1e300 is a finite Python float, but AdamW fails inside torch converting it to fp32."""
    with pytest.raises(InputError, match="lr must be at most") as e:
        TrainConfig(lr=1e300)
    assert e.value.field == "lr"


def test_write_failures_name_the_path_and_the_reason(tmp_path, monkeypatch):
    """torch.save hides the OSError behind "[enforce fail at inline_container.cc]" (it is only the
    RuntimeError's context), safetensors keeps only "(os error N)" in its text."""
    path = tmp_path / "x"
    assert _write_reason(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path) == "no space left on device"
    assert _write_reason(RuntimeError("Error while serializing: I/O error: File too large (os error 27)"),
                         path) == "file too large"
    assert _write_reason(ValueError("not about writing"), path) is None

    def torch_save(obj, f, *args, **kwargs):  # what torch.save does when the file write fails (EFBIG)
        try:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", torch_save)
    cfg = TrainConfig(lr=1e-3, max_steps=1, batch_size=4)
    with pytest.raises(OutputWriteError) as e:
        run(tmp_path, "w", cfg, repetitive(), lora=lora_cfg())
    assert str(e.value) == f"cannot write {tmp_path / 'w' / 'checkpoints' / 'step-1'}: file too large"
    assert e.value.exit_code == 1 and list((tmp_path / "w" / "checkpoints").iterdir()) == []


def test_lora_rank_above_the_narrowest_layer_is_refused(tmp_path):
    cfg = TrainConfig(lr=1e-3, max_steps=1, batch_size=4)
    with pytest.raises(InputError, match=r"r=33 exceeds the rank model\.layers\.1\.mixer\.k_proj can use "
                                         r"\(min\(in_features, out_features\) = 32\); use r <= 32"):
        run(tmp_path, "r", cfg, repetitive(), lora=lora_cfg(r=33))
    assert not (tmp_path / "r").exists()


# ---- final artifacts --------------------------------------------------------------------------------------------
def test_final_adapter_and_merged_model_reproduce_the_trained_model(tmp_path):
    base_dir = tmp_path / "base"
    tiny_model().save_pretrained(str(base_dir))
    (base_dir / "tokenizer_config.json").write_text("{}")  # a side file that must travel
    cfg = TrainConfig(lr=1e-2, max_steps=5, batch_size=4)
    model = NemotronHForCausalLM.from_pretrained(base_dir)
    ids = torch.tensor([[10, 11, 12, 13, 14, 10, 11, 12]])
    logs: list[dict] = []

    def snapshot_logits(m):  # the trained, still unmerged model's logits, taken at the last log
        logs.append(m)
        if m["step"] == 5:
            with torch.no_grad():
                model.eval()
                logs.append(model(ids).logits.clone())
                model.train()

    report = train(model, epoch_batches(repetitive(), cfg), cfg, tmp_path / "run", lora=lora_cfg(),
                   on_log=snapshot_logits, merge=True, base_dir=base_dir)
    trained = logs[-1]
    final, merged = tmp_path / "run" / "final", tmp_path / "run" / "merged"
    assert report["final"] == str(final) and report["merged"] == str(merged)
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    fresh = NemotronHForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        assert (fresh(ids).logits - trained).abs().max() > 1e-4  # training changed something
        load_adapter(fresh, final)
        torch.testing.assert_close(fresh(ids).logits, trained, atol=1e-6, rtol=0)
        full = NemotronHForCausalLM.from_pretrained(merged)
        torch.testing.assert_close(full(ids).logits, trained, atol=1e-5, rtol=0)
    assert (merged / "tokenizer_config.json").is_file()
