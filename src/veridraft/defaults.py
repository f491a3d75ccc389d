"""Defaults shared by the command-line tools."""

from __future__ import annotations

# The model a tool uses when none is named: the smallest catalog model (models/catalog.py).
DEFAULT_MODEL = "smollm2-135m"
