"""The ``nemotron`` Typer app: global options and command registration.

Importing this module must not import torch or transformers (``nemotron --help`` has to be
instant); command modules import heavy libraries inside their function bodies.
"""
from __future__ import annotations

import importlib
import io
import os
from typing import Annotated

import typer

from nemotron_cli import __version__
from nemotron_cli.common import example_epilog, set_debug

# Each module defines `register(app)`. Modules that do not exist yet are skipped, so commands can
# land one at a time.
COMMAND_MODULES = ["env", "init", "convert", "generate", "finetune", "eval", "inspect_pp"]

app = typer.Typer(
    name="nemotron",
    no_args_is_help=True,
    add_completion=False,  # scripts are generated into completions/ (python -m nemotron_cli.completions)
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,  # cli_command reports errors; never dump locals on a crash
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=example_epilog("nemotron env", "nemotron --debug env --json > env.json"),
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"nemotron {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True,
                     help="Print the version and exit."),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Show the traceback when a command fails "
                                     "(same as NEMOTRON_DEBUG=1)."),
    ] = False,
) -> None:
    """Create, convert, run, fine-tune, evaluate and plan Nemotron-H hybrid models.

    Data goes to stdout (`--json`), messages to stderr. Exit codes: 0 ok, 1 failure,
    2 bad input or usage, 130 interrupted. `nemotron CMD --help` shows each command's options.
    """
    if debug:
        set_debug(True)


def _register_commands(target: typer.Typer) -> None:
    for name in COMMAND_MODULES:
        module_name = f"nemotron_cli.commands.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # the module exists but one of *its* imports is missing
                raise
            continue
        module.register(target)


_register_commands(app)


class _ClosedStdout(io.TextIOBase):
    """Stands in for a closed stdout: a write fails as writing to a closed descriptor does in a shell
    (one error line, exit 1), and a command that writes nothing there runs as usual."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        from nemotron_core.errors import NemotronError

        raise NemotronError("standard output is closed")


def main() -> None:
    """Console-script entry point (``nemotron``)."""
    if os.environ.get("_NEMOTRON_COMPLETE"):
        # Shell completion request: add_completion=False means Typer did not register its
        # completion classes, so do it here (only on this path, to keep normal start-up lean).
        from nemotron_cli.completions import register_completion_classes

        register_completion_classes()
    # A fixed prog_name keeps usage lines and the completion variable right under `python -m`.
    # standalone_mode=False hands usage errors back here, so that they read like every other
    # error: one line on stderr, exit 2 (Click's own is a usage line, a hint and a framed box).
    import sys

    if sys.stdout is None:  # started with stdout closed (`nemotron ... >&-`)
        sys.stdout = _ClosedStdout()
    for arg in sys.argv[1:]:
        # Bytes that are not UTF-8 reach Python as lone surrogates, which tokenizers and file writes
        # reject deep inside; name the argument instead.
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            print(f"error: argument {arg!r} is not valid UTF-8", file=sys.stderr)
            sys.exit(2)
    # The Click that Typer runs on (its own copy since Typer 0.22), reached through a class Typer exports.
    errors = sys.modules[typer.BadParameter.__module__]
    try:
        code = app(prog_name="nemotron", standalone_mode=False)
    except getattr(errors, "NoArgsIsHelpError", ()) as e:  # a bare command: its help, as Typer shows it
        _show_click_error(e)
        sys.exit(e.exit_code)
    except errors.UsageError as e:
        print(usage_line(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except errors.ClickException as e:
        _show_click_error(e)
        sys.exit(e.exit_code)
    except typer.Abort:  # end of input at a prompt
        print("aborted", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def usage_line(e: Exception) -> str:
    """A usage error (Click's ``UsageError``) as one line: ``error: <what is wrong> (try 'nemotron CMD -h')``."""
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "nemotron"
    # (Typer's value checks prefix pydantic's "Value error, ", which says nothing here.)
    message = " ".join(e.format_message().replace("Value error, ", "").split())
    return f"error: {message} (try '{where} -h')"


def _show_click_error(e: Exception) -> None:
    from typer import rich_utils

    rich_utils.rich_format_error(e)
