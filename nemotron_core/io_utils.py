"""Small torch-free helpers for files: sizes, atomic output directories."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError, OutputExistsError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """``"5GB"``, ``"500MiB"``, ``"1e6"`` or an int -> bytes."""
    if isinstance(value, int):
        if value <= 0:
            raise InputError(f"size must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m[2].upper() not in _UNITS:
        raise InputError(f"cannot read size {value!r}; use e.g. 500MB, 2GB or 1GiB")
    n = int(float(m[1]) * _UNITS[m[2].upper()])
    if n <= 0:
        raise InputError(f"size must be positive, got {value!r}")
    return n


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: int) -> str:
    """``31577937344`` -> ``31.58B`` (parameter counts)."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def check_output_dir(path: str | os.PathLike, force: bool) -> Path:
    """Refuse a non-empty existing output (or a file in the way) unless ``force``."""
    p = Path(path)
    if p.exists() and not force:
        if not p.is_dir():
            raise OutputExistsError(f"{p} exists and is not a directory; pass --force to replace it")
        if any(p.iterdir()):
            raise OutputExistsError(f"{p} exists and is not empty; pass --force to replace it")
    return p


def check_not_replacing(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """Refuse an output that is one of the inputs or a directory holding one: writing it (with
    --force: replacing it) would destroy what the command reads."""
    out = Path(output).resolve()
    for src in inputs:
        if src is None:
            continue
        s = Path(src).resolve()
        if s == out:
            raise InputError(f"{output} is also the input {src}; choose another output path")
        if out in s.parents:
            raise InputError(f"{output} contains the input {src}; choose another output path")


def _temp_dir_beside(final: Path, shown: str | os.PathLike) -> Path:
    """A temporary directory beside ``final`` (its parent created if missing); a one-line error naming
    the path as the user gave it (``shown``), not the temporary one, when that is impossible."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except FileExistsError as e:  # a file where a directory of the path should be
        raise InputError(f"cannot create {shown}: {e.filename} is a file, not a directory") from None
    except NotADirectoryError:
        raise InputError(f"cannot create {shown}: a part of its path is a file, not a directory") from None
    except OSError as e:
        raise InputError(f"cannot write {shown}: {e.strerror or e}") from None


def remove_path(p: Path) -> None:
    """Remove ``p``: a directory with its contents, or a file or link (never a link's target)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def set_aside(p: Path, tag: str) -> Path:
    """Rename ``p`` (a directory, file or link) to a hidden sibling ``.NAME.TAG-PID`` (``-N`` added when
    that exists: never over what a killed run left behind) and return the new path: instant, nothing
    copied, and it can be renamed back."""
    real = p.resolve()
    base = real.parent / f".{real.name}.{tag}-{os.getpid()}"
    n, aside = 0, base
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = base.with_name(f"{base.name}-{n}")
    os.replace(p, aside)
    return aside


def _apply_umask(root: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for p in root.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    An exception or interrupt removes the temporary directory and leaves ``path`` untouched, so a
    user never finds a half-written model where a complete one (or nothing) was."""
    final = check_output_dir(path, force).resolve()
    tmp = _temp_dir_beside(final, path)
    backup = None
    try:
        yield tmp
        # Still inside the try: an interrupt during the finishing steps must not leave the
        # temporary directory behind or the old output moved aside.
        _apply_umask(tmp)  # mkdtemp makes 0700; give the result the permissions a plain mkdir would
        if final.exists():
            backup = set_aside(final, "old")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup is not None and not final.exists():
            os.replace(backup, final)
        raise
    if backup is not None:
        remove_path(backup)
