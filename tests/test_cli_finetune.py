"""``nemotron finetune`` end to end on a tiny fp32 model made by ``nemotron init``.

One run goes through the installed command in a subprocess (and one more to deliver a real SIGINT);
the rest use Typer's CliRunner in-process, where the model loads in milliseconds once torch is in.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_helpers import REPO_ROOT, cli_env, complete_bash, init_tiny, interrupt_when, nemotron_exe, run_nemotron

FAST = {"OMP_NUM_THREADS": "1"}
LOG_KEYS = {"event", "step", "total_steps", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}
DONE_KEYS = {"event", "output", "final", "merged", "steps", "total_steps", "epoch", "train_loss", "eval_loss", "tokens",
             "resumed_from", "trainable_parameters", "elapsed_s"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return init_tiny(tmp_path_factory, "ft")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ft-data")
    lines = [json.dumps({"text": "the cat sat on the mat. " * 3}),
             json.dumps({"prompt": "Q: what sat on the mat?\nA:", "completion": " the cat"}),
             json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})]
    (d / "train.jsonl").write_text("\n".join(lines * 4) + "\n")
    (d / "eval.jsonl").write_text("\n".join(lines[:2]) + "\n")
    return d


def invoke(*args: str):
    from nemotron_cli.app import app

    return CliRunner().invoke(app, ["finetune", *args])


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def assert_one_error_line(stderr: str, contains: str = "") -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert contains.lower() in lines[0].lower(), lines[0]


# ---- end to end (subprocess) ------------------------------------------------------------------------------------
def test_json_lines_end_to_end_with_eval_and_merge(model_dir, data, tmp_path):
    out = tmp_path / "run"
    proc = run_nemotron("finetune", str(model_dir), "--data", str(data / "train.jsonl"), "--eval-data",
                        str(data / "eval.jsonl"), "--output", str(out), "--steps", "4", "--log-every", "2",
                        "--batch-size", "2", "--lr", "1e-3", "--merge", "--json", **FAST)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    events = json_lines(proc.stdout)
    logs, done = events[:-1], events[-1]
    assert [e["step"] for e in logs] == [2, 4] and all(e["event"] == "log" for e in logs)
    assert all(LOG_KEYS <= set(e) for e in logs)
    assert "eval_loss" in logs[-1] and "eval_loss" not in logs[0]
    assert done["event"] == "done" and DONE_KEYS <= set(done)
    assert done["steps"] == 4 and done["final"] == str(out / "final") and done["merged"] == str(out / "merged")
    assert done["train_loss"] == logs[-1]["loss"] and done["eval_loss"] == logs[-1]["eval_loss"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "final").iterdir()}
    merged = {p.name for p in (out / "merged").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "generation_config.json"} <= merged
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [{k: v for k, v in e.items() if k != "event"} for e in logs]


def test_sigint_saves_a_checkpoint_and_resume_finishes(model_dir, data, tmp_path):
    out = tmp_path / "run"
    args = [str(model_dir), "--data", str(data / "train.jsonl"), "--output", str(out), "--batch-size", "2",
            "--schedule", "constant", "--log-every", "1", "--json"]
    code, first, rest, err = interrupt_when(["finetune", *args, "--steps", "100000"],
                                            ready=lambda out: b"\n" in out, **FAST)  # a whole log line
    stderr = err.decode()
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    events = json_lines((first + rest).decode())
    stop = events[-1]
    assert stop["event"] == "interrupted" and stop["step"] >= 1
    assert Path(stop["checkpoint"]) == out / "checkpoints" / f"step-{stop['step']}"
    assert (Path(stop["checkpoint"]) / "trainer_state.json").is_file()
    assert not (out / "final").exists()

    result = invoke(*args, "--steps", str(stop["step"] + 2), "--resume")
    assert result.exit_code == 0, result.stderr
    done = json_lines(result.stdout)[-1]
    assert done["event"] == "done" and done["resumed_from"] == stop["step"] and done["steps"] == stop["step"] + 2
    assert (out / "final" / "adapter_model.safetensors").is_file()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, stop["step"] + 3))


def test_help_and_completion():
    proc = run_nemotron("finetune", "--help")
    assert proc.returncode == 0
    for word in ("--lora-targets", "--resume", "train_loss", "eval_loss", "event", "Examples"):
        assert word in proc.stdout
    from nemotron_cli.commands.finetune import SCHEDULES as CLI_SCHEDULES
    from nemotron_core.training import SCHEDULES

    assert CLI_SCHEDULES == SCHEDULES
    assert complete_bash(["nemotron", "finetune", "m", "--schedule", ""]) == list(SCHEDULES)
    assert "finetune" in complete_bash(["nemotron", "fi"])


# ---- in-process ---------------------------------------------------------------------------------------------------
def test_full_finetune_human_output_packed_epochs(model_dir, data, tmp_path):
    from nemotron_core.modeling.model import NemotronHForCausalLM

    out = tmp_path / "full"
    result = invoke(str(model_dir), "-d", str(data / "train.jsonl"), "-o", str(out), "--full", "--epochs", "2",
                    "--batch-size", "4", "--grad-accum", "2", "--pack", "--gradient-checkpointing", "--log-every", "1")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "step 1/" in result.stderr and "loss" in result.stderr and "done:" in result.stderr
    assert "final:" in result.stderr and "Traceback" not in result.stderr
    final = out / "final"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= \
        {p.name for p in final.iterdir()}
    NemotronHForCausalLM.from_pretrained(final)
    state = json.loads((out / "checkpoints" / sorted(os.listdir(out / "checkpoints"))[-1] / "trainer_state.json")
                       .read_text())
    assert state["epoch"] == 2 and state["mode"] == "full"


def test_force_replaces_output(model_dir, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("x")
    base = (str(model_dir), "-d", str(data / "train.jsonl"), "-o", str(out), "--steps", "1", "--quiet")
    refused = invoke(*base)
    assert refused.exit_code == 2
    assert_one_error_line(refused.stderr, "--force")
    result = invoke(*base, "--force")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "" and not (out / "old.txt").exists() and (out / "final").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the old output set aside is gone too


@pytest.mark.parametrize("extra, contains", [
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--lora-r", "0"], "--lora-r"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--steps", "2", "--epochs", "1"], "--epochs"),
    (["--warmup-steps", "5", "--steps", "2"], "--warmup-steps"),
    (["--schedule", "step"], "--schedule"),
    (["--epochs", "0"], "--epochs"),
    (["--full", "--merge"], "--merge"),
    (["--resume"], "no checkpoint"),
    (["--max-length", "1"], "--max-length"),
    (["--dtype", "fp16"], "fp16"),
    (["--device", "tpu"], "--device"),
    (["--lora-targets", "nope_proj"], "nope_proj"),
    (["--seed", str(2**64)], "--seed must be in [0, "),
    # The tiny model's narrowest targeted layer (k_proj: 64 -> 32) limits the rank: refused before any
    # adapter is allocated (r=100000 used to write GBs).
    (["--lora-r", "100000"], "--lora-r 100000 exceeds the rank model.layers.1.mixer.k_proj can use "
                             "(min(in_features, out_features) = 32); use --lora-r 32 or less"),
])
def test_bad_options_exit_2_with_one_line(model_dir, data, tmp_path, extra, contains):
    result = invoke(str(model_dir), "-d", str(data / "train.jsonl"), "-o", str(tmp_path / "out"), *extra)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert_one_error_line(result.stderr, contains)
    assert not (tmp_path / "out").exists()


def test_lora_r_at_the_limit_is_accepted(model_dir, data, tmp_path):
    result = invoke(str(model_dir), "-d", str(data / "train.jsonl"), "-o", str(tmp_path / "out"), "--steps", "1",
                    "--lora-r", "32", "--lora-targets", "k_proj", "--quiet")
    assert result.exit_code == 0, result.stderr


# ---- failures keep what the user had ------------------------------------------------------------------------------
def fail_writes(monkeypatch, when=lambda path: True) -> None:
    """Make torch.save (optimizer and RNG state of a checkpoint) fail as on a full disk where ``when(path)``."""
    import torch

    real = torch.save

    def save(obj, f, *args, **kwargs):
        path = Path(getattr(f, "name", f))
        if when(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_file_size_limit_names_the_problem_and_removes_the_run(model_dir, data, tmp_path):
    """A real failed write (RLIMIT_FSIZE, as `ulimit -f`): torch's "[enforce fail at inline_container.cc]"
    becomes the path and the reason, and the half-written output goes, so a plain rerun works."""
    out = tmp_path / "run"
    args = [str(model_dir), "-d", str(data / "train.jsonl"), "-o", str(out), "--steps", "1", "-b", "4", "--quiet"]
    limit = 150_000  # the adapter (~100 kB) fits, the optimizer state (~220 kB) does not
    proc = subprocess.run([nemotron_exe(), "finetune", *args], capture_output=True, text=True, timeout=300,
                          env=cli_env(**FAST), cwd=REPO_ROOT,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 1, proc.stderr
    assert_one_error_line(proc.stderr, f"cannot write {out / 'checkpoints' / 'step-1'}: file too large")
    assert "enforce fail" not in proc.stderr and not out.exists() and list(tmp_path.iterdir()) == []
    rerun = invoke(*args)
    assert rerun.exit_code == 0, rerun.stderr
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_failed_run_in_an_existing_empty_directory_leaves_it_empty(model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    fail_writes(monkeypatch)
    result = invoke(str(model_dir), "-d", str(data / "train.jsonl"), "-o", str(out), "--steps", "1", "--quiet")
    assert result.exit_code == 1, result.stderr
    assert_one_error_line(result.stderr, "no space left on device")
    assert out.is_dir() and list(out.iterdir()) == []


def test_failure_after_a_checkpoint_keeps_it_for_resume_and_force_drops_the_old_output(model_dir, data, tmp_path,
                                                                                     monkeypatch):
    """--force sets the old output aside until the new run's first checkpoint (documented choice): a
    failure after it keeps the new checkpoint (named in the error line) and the old output is gone."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = [str(model_dir), "-d", str(data / "train.jsonl"), "-o", str(out), "--steps", "2", "--save-every", "1",
            "--quiet"]
    fail_writes(monkeypatch, when=lambda path: path.parent.name.startswith(".step-2."))
    result = invoke(*args, "--force")
    assert result.exit_code == 1, result.stderr
    assert_one_error_line(result.stderr, f"no space left on device; kept {out / 'checkpoints' / 'step-1'} "
                                         "(--resume continues from it)")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    monkeypatch.undo()
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_force_puts_the_old_output_back_when_the_run_fails_before_a_checkpoint(model_dir, data, tmp_path,
                                                                               monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    fail_writes(monkeypatch)
    result = invoke(str(model_dir), "-d", str(data / "train.jsonl"), "-o", str(out), "--steps", "1", "--force",
                    "--quiet")
    assert result.exit_code == 1, result.stderr
    assert_one_error_line(result.stderr, f"no space left on device; the previous {out} is back in place")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and (out / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_divergence_stops_without_a_final_adapter(model_dir, data, tmp_path):
    """--lr 1e30: step 1 is finite (its update is huge), step 2's loss is NaN. The run stops there, exit 1,
    keeps the finite step-1 checkpoint; without a checkpoint the output is removed."""
    base = [str(model_dir), "-d", str(data / "train.jsonl"), "--steps", "3", "-b", "4", "--lr", "1e30", "--quiet"]
    out = tmp_path / "run"
    result = invoke(*base, "-o", str(out), "--save-every", "1")
    assert result.exit_code == 1, result.stderr
    assert_one_error_line(result.stderr, "training diverged at step 2 (loss nan); no final adapter written; "
                                         f"kept {out / 'checkpoints' / 'step-1'}")
    assert not (out / "final").exists() and [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    again = invoke(*base, "-o", str(tmp_path / "other"))
    assert again.exit_code == 1
    assert_one_error_line(again.stderr, "diverged at step 2")
    assert not (tmp_path / "other").exists()


def test_resume_with_fewer_steps_than_done_is_refused(model_dir, data, tmp_path):
    """Fewer --steps than the checkpoint has: exit 2, nothing to do (the run cannot be made shorter).
    The same --steps: an info line says nothing was trained (final/ is rewritten from the checkpoint)."""
    out = tmp_path / "run"
    base = [str(model_dir), "-d", str(data / "train.jsonl"), "-o", str(out), "-b", "4"]
    assert invoke(*base, "--steps", "2", "--quiet").exit_code == 0
    final = (out / "final" / "adapter_model.safetensors").read_bytes()
    fewer = invoke(*base, "--steps", "1", "--resume")
    assert fewer.exit_code == 2
    assert_one_error_line(fewer.stderr, f"--steps is 1 but the run is already at step 2 "
                                        f"({out / 'checkpoints' / 'step-2'}); nothing to do")
    same = invoke(*base, "--steps", "2", "--resume")
    assert same.exit_code == 0, same.stderr
    assert f"nothing to train: {out} is already at step 2 of 2" in same.stderr
    assert (out / "final" / "adapter_model.safetensors").read_bytes() == final


def test_bad_paths_and_data_exit_2(model_dir, data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    cases = [
        ((str(tmp_path / "missing-model"), "-d", str(data / "train.jsonl")), "missing-model"),
        ((str(model_dir), "-d", str(tmp_path / "missing.jsonl")), "missing.jsonl"),
        ((str(model_dir), "-d", str(bad)), "bad.jsonl:2"),
        ((str(model_dir), "-d", str(data / "train.jsonl"), "--eval-data", str(bad)), "bad.jsonl:2"),
    ]
    for args, contains in cases:
        result = invoke(*args, "-o", str(tmp_path / "out"))
        assert result.exit_code == 2, (args, result.stderr)
        assert_one_error_line(result.stderr, contains)
    # An output that is the model or holds it: --force would delete what the run reads.
    for out, contains in ((model_dir.parent, "contains the input"), (model_dir, "is also the input")):
        inside = invoke(str(model_dir), "-d", str(data / "train.jsonl"), "-o", str(out), "--force")
        assert inside.exit_code == 2 and (model_dir / "config.json").is_file()
        assert_one_error_line(inside.stderr, contains)
