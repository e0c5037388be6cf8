"""Shell completion scripts for ``nemotron`` (bash, zsh, fish).

The scripts are thin: on <TAB> the shell runs ``nemotron`` with ``_NEMOTRON_COMPLETE=complete_<shell>``
and the app answers from its own command tree, so the committed scripts never go stale when
commands or options change; only a new Typer template would change them.

    python -m nemotron_cli.completions                 # (re)write completions/
    python -m nemotron_cli.completions --check         # exit 1 if completions/ is stale

Typer >= 0.29 vendors click, and its runtime speaks Typer's protocol (``complete_bash``, not
click's ``bash_complete``), so the script classes come from Typer, not from the ``click`` package.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from typer._click.shell_completion import ShellComplete, add_completion_class
from typer._completion_classes import BashComplete, FishComplete, ZshComplete, completion_init

PROG_NAME = "nemotron"
COMPLETE_VAR = "_NEMOTRON_COMPLETE"

# Typer's zsh template starts with a blank line (so `#compdef` is not the first line and compinit
# ignores the file in $fpath) and only calls `compdef`, which does nothing useful when zsh
# autoloads the file as the `_nemotron` function. This one works both sourced and autoloaded; the
# runtime protocol (complete_zsh + _TYPER_COMPLETE_ARGS) is Typer's unchanged.
_ZSH_TEMPLATE = """\
#compdef %(prog_name)s

%(complete_func)s() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" %(autocomplete_var)s=complete_zsh %(prog_name)s)
}

if [[ "${zsh_eval_context[-1]}" == loadautofunc ]]; then
  # autoloaded from $fpath as _%(prog_name)s: complete now
  %(complete_func)s "$@"
else
  # sourced (e.g. from ~/.zshrc): register for later
  compdef %(complete_func)s %(prog_name)s
fi
"""


class NemotronZshComplete(ZshComplete):
    source_template = _ZSH_TEMPLATE


# Output file name (inside the completions folder) -> completion class.
SCRIPTS: dict[str, type[ShellComplete]] = {
    "nemotron.bash": BashComplete,
    "_nemotron": NemotronZshComplete,
    "nemotron.fish": FishComplete,
}


def register_completion_classes() -> None:
    """Register the shells with Typer's runtime (the app has ``add_completion=False``)."""
    completion_init()
    add_completion_class(NemotronZshComplete, "zsh")


def render_scripts() -> dict[str, str]:
    """File name -> script text, generated from the app."""
    import typer.main

    from nemotron_cli.app import app

    cli = typer.main.get_command(app)
    scripts = {}
    for filename, cls in SCRIPTS.items():
        comp = cls(cli, {}, PROG_NAME, COMPLETE_VAR)
        # Format the template directly: BashComplete.source() also shells out to check the
        # local bash version, which says nothing about the user's shell.
        scripts[filename] = (cls.source_template % comp.source_vars()).strip() + "\n"
    return scripts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemotron_cli.completions",
                                     description="Write or check the nemotron completion scripts.")
    parser.add_argument("--out", type=Path, default=Path("completions"),
                        help="folder for the scripts (default: ./completions)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if any script is missing or stale")
    args = parser.parse_args(argv)

    stale = []
    for filename, text in render_scripts().items():
        path = args.out / filename
        current = path.read_text() if path.is_file() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}", file=sys.stderr)
    if args.check and stale:
        names = ", ".join(str(p) for p in stale)
        print(f"error: stale completion scripts: {names}; run `python -m nemotron_cli.completions"
              f" --out {args.out}` and commit the result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
