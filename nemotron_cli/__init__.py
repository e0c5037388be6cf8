"""The ``nemotron`` command-line interface.

Keep this package torch-free at import time: ``nemotron --help`` must answer instantly, so heavy
libraries (torch, transformers) are imported inside command function bodies only.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("nemotron")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
