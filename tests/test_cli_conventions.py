"""The conventions every command shares (README, "CLI conventions"), checked across commands:
shell completion of commands, options, presets, choices and paths; one JSON document (or JSON
Lines) with the documented keys from every reporting command's --json; the exit-code table."""
from __future__ import annotations

import json
import subprocess

import pytest
from typer.testing import CliRunner

from cli_helpers import COMPLETIONS_DIR, cli_env, complete_bash, init_tiny, run_nemotron
from nemotron_cli.app import app
from nemotron_core.presets import preset_names


# ---- completion ------------------------------------------------------------------------------------
def test_completes_command_names() -> None:
    assert complete_bash(["nemotron", "in"]) == ["init", "inspect-pp"]
    assert complete_bash(["nemotron", "ini"]) == ["init"]


def test_completes_generate_options() -> None:
    assert "--temperature" in complete_bash(["nemotron", "generate", "--te"])


def test_completes_preset_names() -> None:
    assert complete_bash(["nemotron", "init", "--preset", ""]) == preset_names()
    assert complete_bash(["nemotron", "init", "--preset", "tiny"]) == ["tiny", "tiny-mtp"]


def test_completes_choices() -> None:
    assert complete_bash(["nemotron", "convert", "a", "b", "--dtype", ""]) == ["bf16", "fp16", "fp32"]


def test_path_arguments_fall_back_to_file_completion() -> None:
    # For a path the program offers nothing, and the script registers `-o default`, so bash's own
    # filename completion takes over (the real shell behaviour a test driver cannot observe).
    assert complete_bash(["nemotron", "convert", "/tm"]) == []
    spec = subprocess.run(["bash", "--norc", "-c", f"source {COMPLETIONS_DIR / 'nemotron.bash'}; complete -p nemotron"],
                          capture_output=True, text=True, env=cli_env(), check=True).stdout
    assert "-o default" in spec


# ---- --json on every reporting command -------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_tiny(tmp_path_factory, "conv", "--dtype", "bf16")


def _json(args: list[str]) -> dict:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_every_reporting_command_emits_documented_json(model_dir, tmp_path) -> None:
    env = _json(["env", "--json"])
    assert {"nemotron", "python", "packages", "torch", "backends"} <= set(env)

    presets = _json(["init", "--list", "--json"])["presets"]
    assert [p["name"] for p in presets] == preset_names()
    assert {"total_parameters", "active_parameters", "pattern", "layers"} <= set(presets[0])

    made = _json(["init", str(tmp_path / "m"), "--json", "--dtype", "fp32"])
    assert {"path", "preset", "pattern", "layers", "parameters", "dtype", "size_bytes"} <= set(made)
    assert {"total", "active"} <= set(made["parameters"])

    conv = _json(["convert", str(model_dir), str(tmp_path / "c"), "--json", "--verify"])
    assert {"source", "path", "dtype", "files", "tensors", "size_bytes", "verify"} <= set(conv)

    result = CliRunner().invoke(app, ["generate", str(model_dir), "--prompt", "hi", "--greedy",
                                      "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 1
    assert {"index", "prompt", "text", "prompt_tokens", "completion_tokens", "finish_reason", "timings"} <= set(lines[0])


# ---- exit codes ------------------------------------------------------------------------------------
def test_exit_code_table(model_dir, tmp_path) -> None:
    assert run_nemotron("env", "--json").returncode == 0  # success
    usage = run_nemotron("init", "--no-such-option")
    assert usage.returncode == 2  # usage error
    bad = run_nemotron("generate", str(model_dir), "--prompt-file", str(tmp_path / "missing.txt"))
    assert bad.returncode == 2  # bad input file
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
    # 130 on an interrupt is exercised with a real SIGINT in test_cli_generate and test_cli_init_convert.
