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
