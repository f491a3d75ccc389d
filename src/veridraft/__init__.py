"""veridraft: faster LLM generation without changing what the model would have said."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from . import draft as _draft
from .errors import VeridraftError

if TYPE_CHECKING:
    from .generate import Generation, generate, generate_ids
    from .loader import LoadedModel, load
    from .sampling import SamplingParams
    from .stats import Stats

# The public names and the module of each, imported on first use: `veridraft --help` and the
# light tools must not pay for torch just because the package was imported.
_LAZY = {
    "Generation": "generate",
    "generate": "generate",
    "generate_ids": "generate",
    "generate_batch": "generate",
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
    "generate_batch",
    "generate_ids",
    "load",
]
__version__ = "0.1.0"


def _draft_env(model):
    from .generate import draft_env

    return draft_env(model)


# What a drafter made without an explicit DraftEnv (make_drafter(spec, model)) may use: the
# loader, the tuned profiles and the cost model. Installed here, at the top, so that the drafters
# never import those stores themselves.
_draft.set_default_env(_draft_env)


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
