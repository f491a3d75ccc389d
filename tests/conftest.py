"""Shared fixtures. The catalog models are pulled on first use (`make test` pulls them before
pytest), into $VERIDRAFT_HOME (default ~/.cache/veridraft); nothing is skipped."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def real_model_dir():
    """Callable: catalog name -> pulled model folder (pulls when missing).

    It follows $VERIDRAFT_HOME at call time: call it before monkeypatching that variable.
    """
    from veridraft.models.catalog import pull

    return pull


@pytest.fixture(scope="session")
def real_model():
    """Callable: catalog name -> LoadedModel, loaded once per name for the whole session."""
    from veridraft.loader import load

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load(name)
        return cache[name]

    return get
