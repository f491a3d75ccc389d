"""veridraft: faster LLM generation without changing what the model would have said."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from .errors import VeridraftError

if TYPE_CHECKING:
    from .generate import Generation, generate
    from .loader import LoadedModel, load
    from .sampling import SamplingParams
    from .stats import Stats

# The public names and the module of each, imported on first use: `veridraft --help` and the
# light tools must not pay for torch just because the package was imported.
_LAZY = {
    "Generation": "generate",
    "generate": "generate",
    "LoadedModel": "loader",
    "load": "loader",
    "SamplingParams": "sampling",
    "Stats": "stats",
}

__all__ = [
    "Generation",
    "LoadedModel",
    "SamplingParams",
    "Stats",
    "VeridraftError",
    "generate",
    "load",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule `veridraft.generate` binds it on the package; the public name
        # `veridraft.generate` is the function, as it was when this file imported it eagerly.
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
