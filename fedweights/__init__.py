"""fedweights: federated, privacy-preserving weight exchange on Flower.

The public names below are imported on first use, so that light commands (``fedweights keys``,
``fedweights privacy plan``) and ``import fedweights.config`` do not pay for torch and Flower.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "ConfigError": ".errors",
    "RunConfig": ".config",
    "RunFailed": ".errors",
    "RunResult": ".flower.round_loop",
    "Task": ".task",
    "UserError": ".errors",
    "load_config": ".config",
    "simulate": ".flower.simulation",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fedweights' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
