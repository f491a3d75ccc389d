"""Where veridraft keeps its files: $VERIDRAFT_HOME, default ~/.cache/veridraft.

Models, compiled kernels, profiles, datastores and peers' venvs all live under it. An unset or
empty VERIDRAFT_HOME means the default (an empty value is what `VERIDRAFT_HOME= cmd` gives, and
the current directory is never meant).
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """$VERIDRAFT_HOME (with ~ expanded), or ~/.cache/veridraft when unset or empty."""
    env = os.environ.get("VERIDRAFT_HOME", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "veridraft"
