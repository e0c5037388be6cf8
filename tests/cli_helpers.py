"""Helpers for testing the installed ``nemotron`` command (plain module: ``import cli_helpers``).

The tests run the real console script, so ``pip install -e .`` must have been run. PATH is
prefixed with this interpreter's scripts folder so that script (not a pyenv shim or another
environment's copy) answers.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPLETIONS_DIR = REPO_ROOT / "completions"
SCRIPTS_DIR = sysconfig.get_path("scripts")


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a ``nemotron`` subprocess: our scripts first on PATH, this checkout first on
    PYTHONPATH (the console script then imports this tree's code even where the editable install
    points at another copy), no color, no inherited debug or completion variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NEMOTRON_DEBUG", "_NEMOTRON_COMPLETE", "FORCE_COLOR")}
    env["PATH"] = os.pathsep.join([SCRIPTS_DIR, env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


def nemotron_exe() -> str:
    """Path of the installed ``nemotron`` console script (fails clearly when not installed)."""
    exe = shutil.which("nemotron", path=SCRIPTS_DIR)
    if exe is None:
        raise AssertionError(f"`nemotron` is not installed in {SCRIPTS_DIR}; "
                             f"run `{sys.executable} -m pip install -e {REPO_ROOT} --no-deps`")
    return exe


def run_nemotron(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``nemotron ARGS...`` and capture stdout and stderr separately (text)."""
    return subprocess.run([nemotron_exe(), *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(**env), cwd=REPO_ROOT)


def interrupt_when(args: list[str], ready: Callable[[bytes], bool], deadline_s: float = 120, settle_s: float = 0.0,
                   **env: str) -> tuple[int, bytes, bytes, bytes]:
    """Run ``nemotron ARGS...``, read its stdout until ``ready(stdout so far)``, wait ``settle_s``,
    send SIGINT (a real Ctrl-C) and collect the rest: (exit code, stdout before, stdout after, stderr)."""
    proc = subprocess.Popen([nemotron_exe(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env(**env), cwd=REPO_ROOT)
    try:
        first = b""
        deadline = time.monotonic() + deadline_s
        while not ready(first) and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                first += os.read(proc.stdout.fileno(), 4096)
        assert ready(first), f"no output to interrupt after before the deadline (exit {proc.poll()})"
        time.sleep(settle_s)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, first, rest, err


# Source the script, set COMP_WORDS/COMP_CWORD as bash would for the cursor at the end of the last
# word, call the function that `complete -p nemotron` names, and print COMPREPLY one per line.
_BASH_DRIVER = r"""
source "$1" || exit 90
shift
COMP_WORDS=("$@")
COMP_CWORD=$(( $# - 1 ))
COMP_LINE="$*"
COMP_POINT=${#COMP_LINE}
func=$(complete -p nemotron | sed -n 's/.* -F \([^ ]*\) .*/\1/p')
[ -n "$func" ] || exit 91
"$func" nemotron "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def complete_bash(words: list[str], script: Path | None = None) -> list[str]:
    """Candidates bash completion offers for ``words`` (the last word is the one being
    completed; pass ``""`` for a fresh word), e.g. ``complete_bash(["nemotron", "e"])``."""
    bash = shutil.which("bash")
    if bash is None:
        raise AssertionError("bash is not installed")
    nemotron_exe()  # the script calls the installed command; fail clearly if it is missing
    script = script or COMPLETIONS_DIR / "nemotron.bash"
    proc = subprocess.run([bash, "--norc", "--noprofile", "-c", _BASH_DRIVER, "complete_bash",
                           str(script), *words],
                          capture_output=True, text=True, timeout=120, env=cli_env(), cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"bash completion failed ({proc.returncode}): {proc.stderr}")
    return [line for line in proc.stdout.splitlines() if line]


def init_tiny(tmp_path_factory, name: str, *extra: str) -> Path:
    """``nemotron init`` a tiny model (in-process, fp32 by default) for a test module; returns its dir."""
    from typer.testing import CliRunner

    from nemotron_cli.app import app

    d = tmp_path_factory.mktemp(name) / "tiny"
    result = CliRunner().invoke(app, ["init", str(d), "--quiet", *(extra or ("--dtype", "fp32"))])
    assert result.exit_code == 0, result.output
    return d
