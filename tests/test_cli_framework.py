"""The CLI framework: fast imports, --help/--version/env, exit codes and errors, completions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import version

import pytest
import typer
from typer.testing import CliRunner

from cli_helpers import (COMPLETIONS_DIR, REPO_ROOT, cli_env, complete_bash, nemotron_exe,
                         run_nemotron)
from nemotron_cli import common
from nemotron_cli.common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    DType,
    JsonOpt,
    Output,
    QuietOpt,
    cli_command,
)
from nemotron_core.errors import InputError, NemotronError


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    # --debug sets a module global; keep tests independent of each other and of the caller's env.
    monkeypatch.setattr(common, "_debug", False)
    monkeypatch.delenv("NEMOTRON_DEBUG", raising=False)


# --- (a) start-up stays torch-free --------------------------------------------------------------

def test_importing_the_cli_does_not_import_torch_or_transformers() -> None:
    code = textwrap.dedent("""
        import importlib, json, pkgutil, sys
        import nemotron_cli, nemotron_cli.app
        names = ["nemotron_cli.app"] + [m.name for m in
                 pkgutil.walk_packages(nemotron_cli.__path__, "nemotron_cli.")]
        culprits = {}
        for name in names:
            importlib.import_module(name)
            for heavy in ("torch", "transformers"):
                if heavy in sys.modules and heavy not in culprits:
                    culprits[heavy] = name
        print(json.dumps({"modules": names, "culprits": culprits}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "nemotron_cli.commands.env" in report["modules"]
    assert report["culprits"] == {}, f"heavy import at module level: {report['culprits']}"


# --- (b) --help, --version, env --json through the installed script -----------------------------

def test_help_lists_commands_and_ends_with_an_example() -> None:
    proc = run_nemotron("--help")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "Usage: nemotron" in proc.stdout
    assert "env" in proc.stdout and "--version" in proc.stdout and "--debug" in proc.stdout
    assert "Example" in proc.stdout
    assert "\x1b[" not in proc.stdout  # NO_COLOR / not a TTY: no escape codes


def test_env_help_has_example() -> None:
    proc = run_nemotron("env", "--help")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "--json" in proc.stdout and "nemotron env --json" in proc.stdout


def test_version() -> None:
    proc = run_nemotron("--version")
    assert proc.returncode == EXIT_OK
    assert proc.stdout.strip() == f"nemotron {version('nemotron')}"


def test_python_dash_m_works() -> None:
    proc = subprocess.run([sys.executable, "-m", "nemotron_cli", "--version"], capture_output=True,
                          text=True, env=cli_env(), cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout.startswith("nemotron ")


def test_env_json_has_documented_keys() -> None:
    proc = run_nemotron("env", "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    report = json.loads(proc.stdout)  # exactly one JSON document on stdout
    assert set(report) == {"nemotron", "python", "packages", "torch", "backends"}
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert set(report["packages"]) >= {"torch", "transformers", "safetensors", "mamba-ssm",
                                       "transformer-engine", "peft", "lm-eval"}
    assert report["packages"]["torch"] == version("torch")
    assert set(report["torch"]) == {"version", "cuda_available", "cuda_version", "device_count",
                                    "device_name"}
    assert set(report["backends"]) == {"mamba_ssm_triton", "nemotron_triton", "flex_attention", "transformer_engine"}
    for backend in report["backends"].values():
        assert set(backend) == {"available", "requires", "missing"}
        assert backend["available"] == (backend["missing"] == [])
    if not report["torch"]["cuda_available"]:
        assert not report["backends"]["mamba_ssm_triton"]["available"]
        assert report["backends"]["nemotron_triton"]["missing"][0] == "CUDA"


def test_env_human_output_goes_to_stderr() -> None:
    proc = run_nemotron("env")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout == ""
    assert "mamba_ssm triton kernels: " in proc.stderr
    assert "flex attention: " in proc.stderr and "transformer-engine: " in proc.stderr


def test_closed_stdout_pipe_is_quiet() -> None:
    # `nemotron env --json | head -c0`: the reader is gone before the JSON is written.
    proc = subprocess.Popen([nemotron_exe(), "env", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_FAILURE
    assert err == ""


def test_unknown_option_is_a_usage_error() -> None:
    assert run_nemotron("env", "--bogus").returncode == EXIT_USAGE
    assert run_nemotron("no-such-command").returncode == EXIT_USAGE


@pytest.mark.parametrize("args,says", [
    (("env", "--bogus"), "error: No such option: --bogus (try 'nemotron env -h')"),
    (("no-such-command",), "error: No such command 'no-such-command'. (try 'nemotron -h')"),
    (("generate", "m", "--dtype", "fp9"),
     "error: Invalid value for '--dtype': 'fp9' is not one of 'bf16', 'fp16', 'fp32'. (try 'nemotron generate -h')"),
    (("generate", "m", "--max-new-tokens", "abc"), "error: Invalid value for '--max-new-tokens' / '-n': "),
    (("generate",), "error: Missing argument 'model'. (try 'nemotron generate -h')"),
])
def test_usage_errors_are_one_line(args: tuple[str, ...], says: str) -> None:
    """A usage error reads like every other error: one line on stderr, naming the problem, exit 2."""
    proc = run_nemotron(*args)
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(says), proc.stderr
    assert proc.stdout == ""


def test_bare_command_still_shows_help() -> None:
    proc = run_nemotron()
    assert proc.returncode == EXIT_USAGE  # (Click's code for a group run without a command)
    assert "Usage: nemotron [OPTIONS] COMMAND" in proc.stdout + proc.stderr and "generate" in proc.stdout + proc.stderr


# --- (c) exit codes and error lines, on a throwaway app using cli_command ------------------------

def _make_app() -> typer.Typer:
    from nemotron_cli.app import root

    app = typer.Typer()
    app.callback()(root)  # the real global options, including --debug

    @app.command()
    @cli_command
    def ok(json_out: JsonOpt = False, quiet: QuietOpt = False) -> None:
        out = Output(json_mode=json_out, quiet=quiet)
        out.info("working")
        out.emit({"answer": 42, "nested": {"x": [1, 2]}})

    @app.command()
    @cli_command
    def bad_input() -> None:
        raise InputError("config.json is missing in /tmp/m\nrun `nemotron init` to create one")

    @app.command()
    @cli_command
    def failure() -> None:
        raise NemotronError("the GPU ran out of memory")

    @app.command()
    @cli_command
    def boom() -> None:
        raise RuntimeError("kaboom")

    @app.command()
    @cli_command
    def interrupt() -> None:
        raise KeyboardInterrupt

    @app.command()
    @cli_command
    def missing() -> None:
        open("/nonexistent/nemotron/config.json")

    @app.command()
    @cli_command
    def exit3() -> None:
        raise typer.Exit(3)

    @app.command()
    @cli_command
    def bad_param() -> None:
        raise typer.BadParameter("must be positive")

    return app


def _invoke(*args: str, **env: str):
    return CliRunner().invoke(_make_app(), list(args), env=env or None)


def test_success_exits_0_and_json_goes_to_stdout_only() -> None:
    result = _invoke("ok", "--json")
    assert result.exit_code == EXIT_OK
    assert json.loads(result.stdout) == {"answer": 42, "nested": {"x": [1, 2]}}
    assert "working" in result.stderr


def test_human_summary_goes_to_stderr_and_quiet_silences_it() -> None:
    result = _invoke("ok")
    assert result.exit_code == EXIT_OK
    assert result.stdout == ""
    assert "answer" in result.stderr and "nested.x" in result.stderr
    quiet = _invoke("ok", "--quiet")
    assert quiet.exit_code == EXIT_OK and quiet.stdout == "" and quiet.stderr == ""


def test_input_error_is_one_line_exit_2() -> None:
    result = _invoke("bad-input")
    assert result.exit_code == EXIT_USAGE
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: config.json is missing in /tmp/m run `nemotron init` to create one"]
    assert "Traceback" not in result.stderr


def test_nemotron_error_exits_1() -> None:
    result = _invoke("failure")
    assert result.exit_code == EXIT_FAILURE
    assert result.stderr == "error: the GPU ran out of memory\n"


def test_unexpected_exception_is_one_line_exit_1() -> None:
    result = _invoke("boom")
    assert result.exit_code == EXIT_FAILURE
    assert result.stderr.splitlines() == [
        "error: RuntimeError: kaboom (run with --debug for the traceback)"]
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how: str) -> None:
    result = _invoke("--debug", "boom") if how == "flag" else _invoke("boom", NEMOTRON_DEBUG="1")
    assert result.exit_code == EXIT_FAILURE
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == "error: RuntimeError: kaboom"


def test_keyboard_interrupt_exits_130() -> None:
    result = _invoke("interrupt")
    assert result.exit_code == EXIT_INTERRUPTED
    assert result.stderr == "interrupted\n"


def test_missing_file_names_the_path_exit_2() -> None:
    result = _invoke("missing")
    assert result.exit_code == EXIT_USAGE
    assert result.stderr.splitlines() == [
        "error: no such file or directory: /nonexistent/nemotron/config.json"]


def test_typer_exit_and_usage_errors_pass_through() -> None:
    assert _invoke("exit3").exit_code == 3
    result = _invoke("bad-param")
    assert result.exit_code == EXIT_USAGE
    assert "must be positive" in result.stderr
    assert _invoke("ok", "--bogus").exit_code == EXIT_USAGE


# --- Output and options --------------------------------------------------------------------------

def test_output_streams(capsys: pytest.CaptureFixture[str]) -> None:
    out = Output(quiet=True)
    out.info("hidden")
    out.warn("disk [almost] full")  # no markup: brackets survive
    out.emit_line({"token": "a", "i": 1})
    out.write("raw [bold]text[/bold]")
    captured = capsys.readouterr()
    assert captured.err == "warning: disk [almost] full\n"
    assert captured.out == '{"token":"a","i":1}\nraw [bold]text[/bold]'
    with Output().progress() as progress:  # stderr is not a TTY under pytest: disabled
        progress.add_task("x", total=1)
    assert capsys.readouterr().err == ""


def test_dtype_choices() -> None:
    import torch

    assert [d.value for d in DType] == ["bf16", "fp16", "fp32"]
    assert DType("bf16").to_torch() is torch.bfloat16
    assert f"{DType.fp16}" == "fp16"


# --- (d, e) shell completions -------------------------------------------------------------------

def test_closed_stdout_is_one_error_line() -> None:
    # `nemotron env --json >&-`: no stdout at all (Python sees None), unlike a reader that went away.
    proc = subprocess.run(["bash", "-c", f"'{nemotron_exe()}' env --json >&-"], capture_output=True, text=True,
                          env=cli_env(), timeout=300)
    assert proc.returncode == EXIT_FAILURE
    assert proc.stderr == "error: standard output is closed\n"


def test_an_argument_that_is_not_utf8_is_named() -> None:
    proc = subprocess.run([os.fsencode(nemotron_exe()), b"init", b"model\xff"], capture_output=True,
                          env=cli_env(), cwd="/tmp", timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.decode() == "error: argument 'model\\udcff' is not valid UTF-8\n"


def test_completion_scripts_are_up_to_date() -> None:
    proc = subprocess.run([sys.executable, "-m", "nemotron_cli.completions", "--check",
                           "--out", str(COMPLETIONS_DIR)], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_completion_check_detects_stale_files(tmp_path) -> None:
    (tmp_path / "nemotron.bash").write_text("# old\n")
    args = [sys.executable, "-m", "nemotron_cli.completions", "--out", str(tmp_path)]
    check = subprocess.run([*args, "--check"], capture_output=True, text=True, env=cli_env())
    assert check.returncode == 1 and "stale" in check.stderr
    assert subprocess.run(args, capture_output=True, env=cli_env()).returncode == 0
    assert subprocess.run([*args, "--check"], capture_output=True, env=cli_env()).returncode == 0


def test_bash_completes_command_names() -> None:
    assert "env" in complete_bash(["nemotron", "e"])


def test_bash_completes_options() -> None:
    assert "--json" in complete_bash(["nemotron", "env", "--j"])
