"""Shared CLI framework: error handling, exit codes, output streams and reusable options.

Conventions every command follows (see README, "CLI conventions"):

* human output (tables, progress, info, warnings, errors) goes to **stderr** through ``Output``;
  data goes to **stdout** (``--json`` documents, JSON Lines streams, generated text);
* exit codes: 0 success, 1 runtime failure, 2 usage or bad input, 130 interrupted;
* errors are one ``error: ...`` line on stderr; ``--debug`` / ``NEMOTRON_DEBUG=1`` adds the traceback.

This module is imported at start-up by every command module, so it must stay torch-free and
import rich lazily (``nemotron --help`` must answer instantly).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import traceback
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, TypeVar

import typer

from nemotron_core.errors import NemotronError

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from rich.progress import Progress, ProgressColumn

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "cli_command",
    "is_debug",
    "set_debug",
    "Output",
    "DType",
    "JsonOpt",
    "QuietOpt",
    "ForceOpt",
    "DeviceOpt",
    "DtypeOpt",
    "MaxShardSizeOpt",
    "example_epilog",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# ---------------------------------------------------------------------------------------------
# Debug flag
# ---------------------------------------------------------------------------------------------

_debug = False  # set by the app callback's --debug


def set_debug(value: bool) -> None:
    """Turn traceback printing on or off (the app callback calls this for ``--debug``)."""
    global _debug
    _debug = value


def is_debug() -> bool:
    """True when ``--debug`` was given or ``NEMOTRON_DEBUG`` is set to a true value."""
    env = os.environ.get("NEMOTRON_DEBUG", "").strip().lower()
    return _debug or env not in ("", "0", "false", "no", "off")


# ---------------------------------------------------------------------------------------------
# Error handling
# ---------------------------------------------------------------------------------------------

_PATH_ERRORS: dict[type[OSError], str] = {
    FileNotFoundError: "no such file or directory",
    PermissionError: "permission denied",
    IsADirectoryError: "is a directory, expected a file",
    NotADirectoryError: "not a directory",
}


def _one_line(text: str) -> str:
    """Collapse a possibly multi-line message so an error is always exactly one line."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _fail(exc: BaseException, message: str, code: int) -> typer.Exit:
    """Print the traceback (debug only) and the one-line error; return the Exit to raise."""
    if is_debug():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    return typer.Exit(code)


def _passthrough_types() -> tuple[type[BaseException], ...]:
    """Exceptions that Typer/click handle themselves (usage errors, Exit, Abort).

    typer>=0.29 vendors click (typer.TyperException is the base of its ClickException); code may
    still raise exceptions of a separately installed ``click``, which we only look up if that
    module was imported (so we never pay for importing it).
    """
    types: list[type[BaseException]] = [typer.Exit, typer.Abort, typer.TyperException]
    click = sys.modules.get("click")
    if click is not None:
        types += [click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort]
    return tuple(types)


F = TypeVar("F", bound=Callable[..., Any])


def cli_command(fn: F) -> F:
    """Wrap a Typer command function so failures become one ``error:`` line and an exit code.

    Put it *below* ``@app.command()``; ``functools.wraps`` keeps the signature Typer reads::

        @app.command()
        @cli_command
        def convert(src: Path, json_out: JsonOpt = False) -> None: ...

    Mapping: ``NemotronError`` -> its ``exit_code`` (1, or 2 for ``InputError``);
    ``KeyboardInterrupt`` -> 130; missing/unreadable paths -> 2; anything else -> 1.
    ``typer.Exit`` and click/Typer usage errors pass through untouched.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NemotronError as e:
            raise _fail(e, f"error: {_one_line(str(e)) or type(e).__name__}", e.exit_code) from None
        except KeyboardInterrupt as e:
            raise _fail(e, "interrupted", EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # The reader went away (`nemotron ... | head`): not an error worth a message. Point
            # stdout at devnull so the interpreter's final flush does not complain again.
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):  # stdout without a file descriptor (tests)
                pass
            raise typer.Exit(EXIT_FAILURE) from None
        except Exception as e:
            if isinstance(e, _passthrough_types()):
                raise
            if isinstance(e, tuple(_PATH_ERRORS)):
                assert isinstance(e, OSError)  # for type checkers
                label = next(v for k, v in _PATH_ERRORS.items() if isinstance(e, k))
                what = f"{label}: {e.filename}" if e.filename is not None else _one_line(str(e))
                raise _fail(e, f"error: {what}", EXIT_USAGE) from None
            msg = _one_line(str(e))
            text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
            hint = "" if is_debug() else " (run with --debug for the traceback)"
            raise _fail(e, f"error: {text}{hint}", EXIT_FAILURE) from None

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _no_color() -> bool:
    # https://no-color.org: any non-empty NO_COLOR disables color; so does a non-terminal stderr.
    return bool(os.environ.get("NO_COLOR")) or not (sys.stderr is not None and sys.stderr.isatty())


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, prefix=f"{name}.")
        elif isinstance(value, (list, tuple)):
            rows.append((name, ", ".join(str(v) for v in value)))
        else:
            rows.append((name, "-" if value is None else str(value)))
    return rows


class Output:
    """Where a command's output goes: humans read stderr, programs read stdout.

    ``json_mode`` (``--json``): ``emit`` prints one JSON document on stdout and nothing else is
    rendered for humans. ``quiet`` (``--quiet``): suppresses info, tables and progress; warnings
    and errors still appear.
    """

    def __init__(self, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        """The rich Console on stderr (created on first use so start-up stays fast)."""
        if self._console is None:
            from rich.console import Console

            no_color = _no_color()
            self._console = Console(stderr=True, no_color=no_color, highlight=False)
        return self._console

    def info(self, text: str) -> None:
        """A human message on stderr (rich markup allowed; escape user text with
        ``rich.markup.escape``). Suppressed by ``--quiet``."""
        if not self.quiet:
            self.console.print(text, soft_wrap=True)

    def warn(self, text: str) -> None:
        """``warning: <text>`` on stderr, always shown. No markup, so messages print verbatim."""
        self.console.print(f"warning: {text}", markup=False, highlight=False, soft_wrap=True,
                           style="yellow")

    def emit(self, data: dict[str, Any],
             render: Callable[[Console], None] | None = None) -> None:
        """Report a result: JSON on stdout with ``--json``, else ``render`` (or a key/value
        table) on stderr unless ``--quiet``."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
            sys.stdout.flush()
            return
        if self.quiet:
            return
        if render is not None:
            render(self.console)
            return
        from rich.table import Table

        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        for key, value in _flatten(data):
            table.add_row(key, value)
        self.console.print(table)

    def emit_line(self, data: dict[str, Any]) -> None:
        """One compact JSON line on stdout, flushed at once (JSON Lines streams)."""
        sys.stdout.write(json.dumps(data, separators=(",", ":"), default=str) + "\n")
        sys.stdout.flush()

    def write(self, text: str) -> None:
        """Raw text on stdout (no markup, no newline added), flushed: generated text, files."""
        sys.stdout.write(text)
        sys.stdout.flush()

    @contextlib.contextmanager
    def working(self, text: str) -> Iterator[None]:
        """A transient spinner with ``text`` on stderr while a long step runs.

        Shown only on a terminal (never under --quiet/--json, nor when stderr is piped or logged)
        and erased when the step ends, so a failure or an interrupt still leaves exactly one line."""
        from rich.markup import escape
        from rich.progress import SpinnerColumn, TextColumn

        with self.progress(SpinnerColumn(), TextColumn("{task.description}"), transient=True) as progress:
            progress.add_task(escape(text), total=None)
            yield

    def progress(self, *columns: str | ProgressColumn, **kwargs: Any) -> Progress:
        """A rich Progress on stderr; disabled under ``--quiet``/``--json`` or when stderr is
        not a terminal, so piped or logged output is never corrupted. Use ``with out.progress()
        as p:``. Arguments go to ``rich.progress.Progress`` (default columns if none given)."""
        from rich.progress import Progress

        enabled = not (self.quiet or self.json_mode) and self.console.is_terminal
        kwargs.setdefault("disable", not enabled)
        return Progress(*columns, console=self.console, **kwargs)


MaxShardSizeOpt = Annotated[
    str, typer.Option("--max-shard-size", help="Largest safetensors shard, e.g. 5GB, 500MB.")
]


def example_epilog(*commands: str) -> str:
    """Help epilog showing worked example command lines.

    The app uses Typer's ``rich_markup_mode="markdown"``: help text is Markdown, and a fenced
    block is the one form that keeps an epilog's line breaks. Usage::

        app.command("env", epilog=example_epilog("nemotron env --json | jq .backends"))
    """
    body = "\n".join(commands)
    return f"**Example{'s' if len(commands) > 1 else ''}**\n\n```\n{body}\n```"


# ---------------------------------------------------------------------------------------------
# Reusable options (use with a default in the signature, e.g. ``json_out: JsonOpt = False``)
# ---------------------------------------------------------------------------------------------


class DType(str, Enum):
    """Parameter dtype choices for ``--dtype``."""

    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"

    def __str__(self) -> str:  # so f"{dtype}" prints "bf16", not "DType.bf16"
        return self.value

    def to_torch(self) -> torch.dtype:
        """The matching ``torch.dtype`` (imports torch, so call it inside a command body)."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.value]


JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON document on stdout instead of the human summary."),
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress or summary on stderr (warnings and errors "
                                       "still show)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", help="Where to run: auto (CUDA if available, else CPU), cpu, cuda, "
                                  "cuda:N."),
]
DtypeOpt = Annotated[
    DType,
    typer.Option("--dtype", case_sensitive=False, help="Parameter dtype."),
]
