"""nemotron_core: the Nemotron-H / Nemotron 3 hybrid model library.

Imports are lazy so that ``import nemotron_core`` (and the CLI) stays instant; the heavy modules
load on first use of a name below.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NemotronHConfig": "nemotron_core.config",
    "load_config": "nemotron_core.config",
    "BackendConfig": "nemotron_core.backend",
    "NemotronV3Model": "nemotron_core.modeling.model",
    "NemotronHForCausalLM": "nemotron_core.modeling.model",
    "NemotronHCausalLMOutputWithPast": "nemotron_core.modeling.model",
    "ModelClass": "nemotron_core.modeling.model",
    "NemotronHybridCache": "nemotron_core.cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nemotron_core' has no attribute {name!r}")
