"""Error types shared by the library and the CLI.

This module must stay free of heavy imports (no torch): the CLI imports it at start-up to map
exceptions to exit codes.
"""
from __future__ import annotations


class NemotronError(Exception):
    """Base class for errors that the CLI reports as one line.

    ``exit_code`` follows the CLI convention: 1 for a runtime failure, 2 for bad input or usage.
    """

    exit_code = 1


class InputError(NemotronError):
    """The user gave something unusable: a bad path, file, option or value (exit code 2)."""

    exit_code = 2


class ConfigError(InputError):
    """config.json is missing, unreadable, or inconsistent."""


class CheckpointError(InputError):
    """A weights file is missing, truncated, corrupt, or contradicts the config."""


class OutputExistsError(InputError):
    """The output path exists and is not empty; pass --force to replace it."""


# Seeds are kept to int64's non-negative range: torch.Generator.manual_seed takes those (and a command
# adds small offsets per batch), while Python ints beyond 64 bits fail inside torch with an overflow.
MAX_SEED = 2**63 - 1


def check_seed(seed: int | None, name: str = "seed") -> None:
    """An InputError naming ``name`` for a seed outside [0, MAX_SEED] (None: no seed, fine)."""
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InputError(f"{name} must be in [0, {MAX_SEED}], got {seed}")
