"""Build, cache and import veridraft's own CPU kernels (C++ torch extensions next to this file).

Each kernel is compiled once per source, torch version, compiler and flags into
``$VERIDRAFT_HOME/kernels/<stem>-<hash>`` and imported directly by later processes. The build
runs in a folder of its own that is renamed into place only once the library is complete, so an
interrupted or failed build leaves nothing that a later process would take for a kernel."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..home import home

# AVX512-BF16 is the newest instruction set the kernels use (vdpbf16ps: exact bfloat16 products
# summed in float32); every CPU with it has the rest of AVX-512 they use, VNNI (q4a8's vpdpbusd)
# included.
FLAGS = [
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mavx512vnni",
    "-mfma",
    "-fopenmp",
]
# The q4 kernel's build for x86 CPUs without it (AMD before Zen 4, Intel before Cooper Lake).
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC", ...) from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo), e.g. "avx512_bf16", "amx_bf16"."""
    return _cpu_flags()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


ISAS = ("avx512bf16", "avx2")  # newest first


def isa() -> str | None:
    """The newest build this CPU runs: "avx512bf16", "avx2" (with FMA and F16C), or None
    (read from /proc/cpuinfo). VERIDRAFT_ISA=avx2 or =none caps it, so that an AVX-512 machine
    runs what an older CPU would (with ONEDNN_MAX_CPU_ISA=AVX2 and FBGEMM_ENABLE_INSTRUCTIONS=AVX2
    for torch's own kernels: docs/precision.md)."""
    flags = _cpu_flags()
    best = None
    if {"avx512_bf16", "avx512_vnni", "avx512bw", "avx512vl"} <= flags:
        best = "avx512bf16"
    elif {"avx2", "fma", "f16c"} <= flags:
        best = "avx2"
    cap = os.environ.get("VERIDRAFT_ISA", "").strip().lower()
    if not cap:
        return best
    if cap not in (*ISAS, "none"):
        raise ValueError(f"VERIDRAFT_ISA={cap!r}: use one of {', '.join(ISAS)}, none (or unset it)")
    if cap == "none" or best is None:
        return None
    return ISAS[max(ISAS.index(cap), ISAS.index(best))]


def cpu_supported() -> bool:
    """True when the CPU has the AVX512-BF16 instructions the kernels use (/proc/cpuinfo)."""
    return isa() == "avx512bf16"


def _compiler_id() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return ""


def build_dir(stem: str, source: Path, flags: list[str], deps: tuple[Path, ...] = ()) -> Path:
    """Where a kernel lives: one folder per source (and the files it includes, `deps`), torch
    version, compiler and flags."""
    key = hashlib.sha256(
        source.read_bytes()
        + b"".join(d.read_bytes() for d in deps)
        + torch.__version__.encode()
        + _compiler_id().encode()
        + " ".join(flags).encode()
    ).hexdigest()[:16]
    return home() / "kernels" / f"{stem}-{key}"


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(stem: str, source: Path, flags: list[str], what: str, deps: tuple[Path, ...] = ()):
    """Import the kernel built from `source` (which includes `deps`), compiling it first when
    this machine has none (printing one line that says so: `what` names the kernel)."""
    from torch.utils import cpp_extension

    folder = build_dir(stem, source, flags, deps)
    name = f"veridraft_{stem}_" + folder.name.rsplit("-", 1)[1]
    if (folder / f"{name}.so").is_file():
        return _import(name, folder / f"{name}.so")
    print(
        f"veridraft: compiling {what} once for this machine (about 20 s on two cores; "
        f"cached in {folder})",
        file=sys.stderr,
        flush=True,
    )
    # The ninja from PyPI lives next to the interpreter, which need not be on PATH.
    bindir = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and (Path(bindir) / "ninja").exists():
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        module = cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(work),
            verbose=False,
        )
        try:
            work.rename(folder)
        except OSError:  # another process finished first: its library is the same
            pass
        return module
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
