"""The command line's help: every command answers without importing torch or the models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "numpy", "transformers", "matplotlib", "llama_cpp")

# Runs each help in one fresh interpreter and reports the heavy modules it imported.
PROBE = """
import contextlib, io, json, sys
from veridraft.cli import main
out = {}
for argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code
    out[" ".join(argv)] = {"code": code, "help": buf.getvalue()}
out["heavy"] = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2].split(",")))
print(json.dumps(out))
"""

COMMANDS = [
    ["--help"],
    ["generate", "--help"],
    ["models", "--help"],
    ["bench", "--help"],
    ["bench", "compare", "--help"],
    ["profile", "--help"],
    ["tune", "layerskip", "--help"],
]


def _probe(commands: list[list[str]]) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(commands), ",".join(HEAVY)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_help_does_not_import_torch():
    out = _probe(COMMANDS)
    assert out.pop("heavy") == []
    for argv in COMMANDS:
        res = out[" ".join(argv)]
        assert res["code"] == 0
        assert res["help"].startswith("usage: veridraft")


@pytest.mark.parametrize("argv", [["bench", "--help"], ["tune", "layerskip", "--help"]])
def test_help_lists_the_options(argv):
    text = _probe([argv])[" ".join(argv)]["help"]
    assert "--model" in text and "--max-new-tokens" in text


def test_package_import_is_lazy_but_complete():
    code = (
        "import sys, veridraft; before = 'torch' in sys.modules; "
        "import veridraft.generate; "
        "print(before, callable(veridraft.generate), veridraft.generate.__module__, "
        "veridraft.load.__name__, 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "veridraft.generate", "load", "True"]
