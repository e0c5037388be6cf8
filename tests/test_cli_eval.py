"""``nemotron eval`` on a tiny fp32 model made by ``nemotron init``: perplexity and lm-eval tasks.

One run goes through the installed command in a subprocess; the rest use Typer's CliRunner in-process.
"""
from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tiny
from cli_helpers import init_tiny, run_nemotron

PPL_KEYS = {"model", "adapter", "data", "loss", "perplexity", "bits_per_token", "tokens", "examples", "seconds"}
TASK_KEYS = {"model", "adapter", "tasks", "num_fewshot", "limit", "results", "groups", "n_shot", "n_samples",
             "versions", "higher_is_better", "seconds"}
LINES = [{"text": "the cat sat on the mat. " * 3},
         {"prompt": "Q: what sat on the mat?\nA:", "completion": " the cat"},
         {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]


@pytest.fixture(autouse=True)
def _no_progress_env(monkeypatch):
    # The command sets these (setdefault) when stderr is not a terminal; keep them out of os.environ after a test.
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return init_tiny(tmp_path_factory, "ev")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ev-data") / "dev.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in LINES) + "\n")
    return p


def invoke(*args: str):
    from nemotron_cli.app import app

    return CliRunner().invoke(app, ["eval", *args])


def assert_one_error_line(stderr: str, contains: str = "") -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert contains.lower() in lines[0].lower(), lines[0]


# ---- perplexity -----------------------------------------------------------------------------------------------
def test_json_end_to_end_matches_the_library(model_dir, data):
    proc = run_nemotron("eval", str(model_dir), "--data", str(data), "--json", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    doc = json.loads(proc.stdout)
    assert set(doc) == PPL_KEYS
    assert doc["model"] == str(model_dir) and doc["data"] == str(data) and doc["adapter"] is None
    assert doc["examples"] == 3 and doc["tokens"] > 0 and doc["seconds"] >= 0

    import torch
    from transformers import AutoTokenizer

    from nemotron_core.data import load_examples
    from nemotron_core.evaluation import load_for_eval, perplexity

    model, tok = load_for_eval(model_dir, device="cpu", dtype=torch.float32)
    want = perplexity(model, load_examples(data, AutoTokenizer.from_pretrained(str(model_dir)), 4096))
    for key in ("loss", "perplexity", "bits_per_token"):
        assert doc[key] == pytest.approx(want[key], rel=1e-6)
    assert doc["tokens"] == want["tokens"]


def test_human_summary_on_stderr_and_pack_gives_the_same_numbers(model_dir, data):
    human = invoke(str(model_dir), "--data", str(data), "--batch-size", "2")
    assert human.exit_code == 0, human.stderr
    assert human.stdout == ""
    assert "perplexity" in human.stderr and "bits/token" in human.stderr and "3 examples" in human.stderr
    padded = json.loads(invoke(str(model_dir), "-d", str(data), "--json").stdout)
    packed = json.loads(invoke(str(model_dir), "-d", str(data), "--json", "--pack").stdout)
    assert packed["tokens"] == padded["tokens"]
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-6)
    assert invoke(str(model_dir), "-d", str(data), "--quiet").stderr == ""


def test_non_finite_loss_is_an_error_not_a_nan_score(model_dir, data, tmp_path):
    """A model whose logits are NaN has no perplexity to report (and NaN is not valid JSON)."""
    broken = tiny.nan_lm_head_copy(model_dir, tmp_path / "nan")
    result = invoke(str(broken), "--data", str(data), "--json")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (f"error: {broken}: the loss is nan: the model's logits are not finite; "
                                              "are its weights finite?")


def test_max_length_cuts_examples(model_dir, data):
    full = json.loads(invoke(str(model_dir), "-d", str(data), "--json").stdout)
    cut = json.loads(invoke(str(model_dir), "-d", str(data), "--json", "--max-length", "20").stdout)
    assert cut["tokens"] < full["tokens"]


def test_adapter_is_merged(model_dir, data, tmp_path):
    import torch

    from nemotron_core.evaluation import load_for_eval
    from nemotron_core.lora import LoraConfig, apply_lora, lora_modules, save_adapter

    model, _ = load_for_eval(model_dir, device="cpu", dtype=torch.float32)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["in_proj"])
    apply_lora(model, config)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.5)
    save_adapter(model, tmp_path / "lora", config)
    base = json.loads(invoke(str(model_dir), "-d", str(data), "--json").stdout)
    tuned = invoke(str(model_dir), "-d", str(data), "--json", "--adapter", str(tmp_path / "lora"))
    assert tuned.exit_code == 0, tuned.stderr
    doc = json.loads(tuned.stdout)
    assert doc["adapter"] == str(tmp_path / "lora") and doc["loss"] != pytest.approx(base["loss"], rel=1e-6)


@pytest.mark.parametrize("case", ["no-model", "no-data", "malformed", "both", "neither", "pack-tasks",
                                  "fewshot-data", "batch-size", "max-length", "device", "no-adapter"])
def test_bad_input_is_one_error_line_exit_2(model_dir, data, tmp_path, case):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(LINES[0]) + "\n" + '{"text": "ok"\n')
    args, contains = {
        "no-model": ([str(tmp_path / "nope"), "--data", str(data)], "no such model directory"),
        "no-data": ([str(model_dir), "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        "malformed": ([str(model_dir), "--data", str(bad)], f"{bad}:2:"),
        "both": ([str(model_dir), "--data", str(data), "--tasks", "x"], "cannot be used together"),
        "neither": ([str(model_dir)], "pass --data"),
        "pack-tasks": ([str(model_dir), "--tasks", "x", "--pack"], "--pack applies to --data"),
        "fewshot-data": ([str(model_dir), "--data", str(data), "--num-fewshot", "1"], "--num-fewshot applies to --tasks"),
        "batch-size": ([str(model_dir), "--data", str(data), "--batch-size", "0"], "--batch-size"),
        "max-length": ([str(model_dir), "--data", str(data), "--max-length", "100000"], "exceeds the model's limit"),
        "device": ([str(model_dir), "--data", str(data), "--device", "tpu"], "--device"),
        "no-adapter": ([str(model_dir), "--data", str(data), "--adapter", str(tmp_path / "x")], "no such adapter"),
    }[case]
    result = invoke(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert_one_error_line(result.stderr, contains)


def test_help_documents_json_and_examples():
    from nemotron_cli.app import app

    result = CliRunner().invoke(app, ["eval", "--help"], env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("--data", "--tasks", "--include-path", "bits_per_token", "higher_is_better", "Examples",
                 "nemotron eval ./model --data dev.jsonl"):
        assert text in result.stdout, text


def test_install_hint_is_the_librarys():
    from nemotron_cli.commands.eval import INSTALL_HINT
    from nemotron_core.evaluation import LM_EVAL_HINT

    assert INSTALL_HINT == LM_EVAL_HINT


# ---- lm-eval tasks -----------------------------------------------------------------------------------------------
def test_tasks_without_lm_eval_is_exit_2_with_install_hint(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: `import lm_eval` fails
    result = invoke(str(model_dir), "--tasks", "arc_easy")
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "pip install 'nemotron[eval]'")


@pytest.fixture
def task_dir(tmp_path, fast_lm_eval) -> Path:
    """A local multiple-choice task (lm-eval's slow start-up work skipped by ``fast_lm_eval``)."""
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"q": f"{i} plus one is", "choices": [str(i + 1), str(i + 2)], "label": 0})
                              for i in range(5)) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files: {{test: "{data}"}}
          cache_dir: "{tmp_path / 'hf-cache'}"
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{q}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
        """))
    return tasks


def test_tasks_json_and_human(model_dir, task_dir):
    result = invoke(str(model_dir), "--tasks", "tiny_*", "--include-path", str(task_dir), "--limit", "3",
                    "--num-fewshot", "1", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == TASK_KEYS
    assert doc["tasks"] == ["tiny_mc"] and doc["limit"] == 3 and doc["num_fewshot"] == 1
    assert doc["n_samples"]["tiny_mc"]["effective"] == 3 and doc["n_shot"]["tiny_mc"] == 1
    assert 0 <= doc["results"]["tiny_mc"]["acc,none"] <= 1
    human = invoke(str(model_dir), "--tasks", "tiny_mc", "--include-path", str(task_dir), "--limit", "2")
    assert human.exit_code == 0, human.stderr
    assert human.stdout == "" and "tiny_mc" in human.stderr and "acc" in human.stderr


def test_unknown_task_is_exit_2(model_dir, task_dir):
    result = invoke(str(model_dir), "--tasks", "tiny_mc,nope", "--include-path", str(task_dir))
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "unknown task nope")


def test_a_task_whose_dataset_is_not_cached_offline_is_exit_2(model_dir, task_dir, tmp_path, monkeypatch):
    """Offline (HF_HUB_OFFLINE=1) a Hub dataset that is not in the datasets cache cannot be fetched: the
    error says so and what to do, instead of a ConnectionError from deep inside datasets."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-datasets-cache"))
    tasks = tmp_path / "remote-tasks"
    shutil.copytree(task_dir, tasks)
    text = (tasks / "tiny_mc.yaml").read_text().replace("task: tiny_mc", "task: tiny_remote")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith(("dataset_kwargs", "data_files",
                                                                              "cache_dir"))]
    (tasks / "tiny_remote.yaml").write_text("\n".join(line.replace("dataset_path: json",
                                                                    "dataset_path: nemotron-tests/not-cached")
                                                       for line in lines) + "\n")
    result = invoke(str(model_dir), "--tasks", "tiny_remote", "--include-path", str(tasks), "--limit", "2")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: a task's dataset is not available offline (")


def test_a_task_yaml_that_does_not_parse_is_named(model_dir, task_dir, tmp_path):
    """lm-eval skips a task file it cannot parse, so its task looks unknown: the error says which file."""
    broken = tmp_path / "broken-tasks"
    shutil.copytree(task_dir, broken)
    (broken / "bad.yaml").write_text("task: bad\n  : : [\n")
    result = invoke(str(model_dir), "--tasks", "bad", "--include-path", str(broken))
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, f"unknown task bad: {broken / 'bad.yaml'} does not parse (line 2")
