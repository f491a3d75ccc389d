"""Build llama.cpp's own `llama-server`, the peer of `veridraft serve` in the load test.

    python -m veridraft.serve.llama_server --cmake-args "-DGGML_NATIVE=OFF -DGGML_AVX2=ON ..."

(`make setup-llama-server` runs this with the portable CPU flags `make setup-llamacpp` builds
llama-cpp-python with.) The llama.cpp sources are the ones vendored in llama-cpp-python's source
distribution, fetched from the package index with pip, so the server is the same llama.cpp as the
`llamacpp:` peers of `veridraft bench`. Only the llama-server target is built (Release, static
libraries, so the one file runs on its own), then checked with `--version` and moved into
$VERIDRAFT_HOME/bin/llama-server in one rename: a failed build leaves the previous binary, or
none, never half of one. A stamp beside it records the version and the CMake flags; a second run
with the same ones does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ..errors import VeridraftError
from ..home import home

# The llama-cpp-python release whose vendored llama.cpp is built (the one the benchmark reports
# name for the llamacpp: peers).
VERSION = "0.3.36"
PACKAGE = "llama-cpp-python"

# Besides the caller's CPU flags: no shared libraries (one self-contained file to install), no
# tests or examples, and no step that reaches the network at build time (the web UI's prebuilt
# assets are downloaded from a model hub by default; the server runs without them) or needs
# OpenSSL (the load test speaks plain HTTP on loopback).
FIXED_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)


def binary_path() -> Path:
    """Where the build puts llama-server: $VERIDRAFT_HOME/bin/llama-server."""
    return home() / "bin" / "llama-server"


def _stamp_path(binary: Path) -> Path:
    return binary.with_name(binary.name + ".json")


def stamp(version: str, cmake_args: list[str]) -> dict:
    """What a build is identified by: the same stamp means the same binary."""
    return {"package": f"{PACKAGE}=={version}", "cmake_args": list(cmake_args)}


def is_built(binary: Path, want: dict) -> bool:
    """True when `binary` is there, executable, and its stamp is `want`."""
    try:
        have = json.loads(_stamp_path(binary).read_text())
    except (OSError, ValueError):
        return False
    return have == want and os.access(binary, os.X_OK)


def find_tools() -> tuple[str, list[str]]:
    """cmake and the CMake generator arguments, or a one-line error naming what to install. A
    cmake missing from PATH is looked for beside this Python (a venv's `pip install cmake`)."""
    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if cmake is None:
        raise VeridraftError(
            "cmake not found: apt-get install cmake (or pip install cmake in this environment)"
        )
    cxx = os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None
    )
    if cxx is None or shutil.which(cxx) is None:
        raise VeridraftError("no C++ compiler found: apt-get install g++ (or set CXX)")
    if shutil.which("make"):
        return cmake, ["-G", "Unix Makefiles"]
    if shutil.which("ninja"):
        return cmake, ["-G", "Ninja"]
    raise VeridraftError("neither make nor ninja found: apt-get install make")


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, cwd=cwd)
    if r.returncode != 0:
        raise VeridraftError(f"{what} failed (exit status {r.returncode}); its output is above")


def download_sdist(version: str, dest: Path) -> Path:
    """llama-cpp-python's source distribution, by pip. --no-binary names the package alone: as
    `:all:` it would also build pip's own metadata tools from source."""
    _run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--no-binary", PACKAGE, f"{PACKAGE}=={version}", "-d", str(dest)],
        f"pip download {PACKAGE}=={version}",
    )  # fmt: skip
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise VeridraftError(f"pip downloaded no source distribution of {PACKAGE}=={version}")
    return found[0]


def unpack_llama_cpp(sdist: Path, dest: Path) -> Path:
    """The llama.cpp tree vendored in the sdist (vendor/llama.cpp), unpacked under dest."""
    # The "data" filter (no absolute paths, links out of dest or devices) where Python has it.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, **safe)
    trees = [p for p in dest.glob("*/vendor/llama.cpp") if (p / "CMakeLists.txt").is_file()]
    if not trees:
        raise VeridraftError(f"{sdist.name} has no vendor/llama.cpp with a CMakeLists.txt")
    return trees[0]


def install(built: Path, binary: Path, info: dict) -> None:
    """Copy `built` next to `binary` under a temporary name, then rename it over: the rename is
    atomic, so `binary` is the old file or the new one. The stamp follows the same way."""
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f".{binary.name}.tmp{os.getpid()}")
    try:
        shutil.copyfile(built, tmp)
        tmp.chmod(0o755)
        os.replace(tmp, binary)
    finally:
        tmp.unlink(missing_ok=True)
    st = _stamp_path(binary)
    tmp_st = st.with_name(f".{st.name}.tmp{os.getpid()}")
    tmp_st.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp_st, st)


def build(
    version: str = VERSION,
    cmake_args: list[str] | tuple[str, ...] = (),
    *,
    jobs: int = 2,
    force: bool = False,
    binary: Path | None = None,
) -> Path:
    """Build llama-server from llama-cpp-python `version`'s vendored llama.cpp with `cmake_args`
    (CPU flags) and install it at `binary` (default binary_path()). Returns its path."""
    binary = binary or binary_path()
    args = [*FIXED_CMAKE_ARGS, *cmake_args]
    info = stamp(version, args)
    if not force and is_built(binary, info):
        print(f"llama-server from {PACKAGE} {version} is built with these flags: {binary}")
        return binary
    cmake, generator = find_tools()
    binary.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    # The work tree sits beside the destination (same file system, so the install is a rename)
    # and goes away whatever happens.
    with tempfile.TemporaryDirectory(prefix=".llama-server-build-", dir=binary.parent) as tmp:
        work = Path(tmp)
        src = unpack_llama_cpp(download_sdist(version, work / "sdist"), work / "src")
        out = work / "build"
        _run([cmake, "-S", str(src), "-B", str(out), *generator, *args], "cmake configure")
        _run(
            [cmake, "--build", str(out), "--target", "llama-server", "-j", str(jobs)],
            "cmake build",
        )
        built = out / "bin" / "llama-server"
        if not built.is_file():
            raise VeridraftError(f"the build finished but left no {built.relative_to(work)}")
        # A binary that cannot run on this CPU ("Illegal instruction") is not installed.
        r = subprocess.run([str(built), "--version"], capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise VeridraftError(
                f"the built llama-server does not run (exit status {r.returncode}: {last[0]}); "
                "try other --cmake-args"
            )
        install(built, binary, info)
    print(f"llama-server from {PACKAGE} {version}: {binary} ({time.monotonic() - t0:.0f} s)")
    return binary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m veridraft.serve.llama_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--package-version", default=VERSION, help=f"{PACKAGE} version (default {VERSION})"
    )
    p.add_argument(
        "--cmake-args",
        default=os.environ.get("CMAKE_ARGS", ""),
        help="CPU flags for CMake, one string (default: $CMAKE_ARGS)",
    )
    p.add_argument("--jobs", "-j", type=int, default=2, help="parallel compile jobs (default 2)")
    p.add_argument("--force", action="store_true", help="build even when the stamp matches")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    try:
        build(args.package_version, shlex.split(args.cmake_args), jobs=args.jobs, force=args.force)
    except VeridraftError as e:
        print(f"veridraft: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
