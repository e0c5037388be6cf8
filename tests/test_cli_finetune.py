"""``nemotron finetune`` end to end on a tiny fp32 model made by ``nemotron init``.

One run goes through the installed command in a subprocess (and one more to deliver a real SIGINT);
the rest use Typer's CliRunner in-process, where the model loads in milliseconds once torch is in.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_helpers import complete_bash, init_tiny, interrupt_when, run_nemotron

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
])
def test_bad_options_exit_2_with_one_line(model_dir, data, tmp_path, extra, contains):
    result = invoke(str(model_dir), "-d", str(data / "train.jsonl"), "-o", str(tmp_path / "out"), *extra)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert_one_error_line(result.stderr, contains)


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
    inside = invoke(str(model_dir), "-d", str(data / "train.jsonl"), "-o", str(model_dir.parent), "--force")
    assert inside.exit_code == 2 and model_dir.is_dir()
    assert_one_error_line(inside.stderr, "model directory")
