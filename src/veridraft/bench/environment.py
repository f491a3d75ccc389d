"""The machine a benchmark ran on: CPU name, versions, threads, load, the command line."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from .. import __version__
from ..models.kernels import cpu_name

# Environment variables that change CPU threading, recorded with every run.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")


def _version_of(dist: str) -> str | None:
    # Read from package metadata, not by importing: llama_cpp loads a native library that may
    # not run on this CPU, and the run's own process must never load it (see peer_worker).
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def environment(threads: int, command: str | None = None) -> dict:
    """Versions, CPU, threads and load: what a figure depends on besides the code."""
    tv = _version_of("transformers")
    vv = _version_of("veridraft") or __version__
    lv = _version_of("llama_cpp_python")

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command if command is not None else command_line(),
        "veridraft": vv,
        "torch": torch.__version__,
        "transformers": tv,
        "llama_cpp_python": lv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "load_average": loadavg(),
        "env_vars": {k: os.environ[k] for k in THREAD_ENV_VARS if k in os.environ},
    }


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it: `veridraft bench ...` or `python -m ...`."""
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0]).name if argv else ""
    if prog == "veridraft":
        head = ["veridraft"]
    elif prog == "__main__.py":
        mod = Path(argv[0]).parent.name
        head = ["python", "-m", "veridraft" if mod == "veridraft" else f"veridraft.{mod}"]
    else:
        head = [prog] if prog else []
    env = [f"{k}={os.environ[k]}" for k in THREAD_ENV_VARS if k in os.environ]
    return shlex.join(env + head + argv[1:])


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other processes competing for the cores skew timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None
