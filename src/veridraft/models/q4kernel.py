"""Build, cache and load q4 mode's own CPU kernel (q4kernel.cpp), and pack weights for it.

The kernel has two builds, picked by the CPU: AVX512-BF16 (AMD Zen 4 and later, Intel Cooper
Lake, Sapphire Rapids and later) and AVX2 with FMA and F16C (older x86 CPUs); either needs a C++
compiler. It is compiled once per source, torch version, compiler and flags into
``$VERIDRAFT_HOME/kernels/`` (about 20 s on two cores; later processes import the built
library). Where it cannot be built or the CPU has neither, q4 mode falls back to
torch's int4 kernel, says why once, and stays correct. ``VERIDRAFT_Q4_KERNEL=aten`` forces
the fallback (for comparisons)."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from . import kernels

SOURCE = Path(__file__).with_name("q4kernel.cpp")
FLAGS = list(kernels.AVX2_FLAGS if kernels.isa() == "avx2" else kernels.FLAGS)
NIB, NIB5, NIB6, INT8 = 0, 1, 2, 3  # code layouts, as in q4kernel.cpp
F32, F16, K2 = 0, 1, 2  # scale layouts
A8 = 8  # layout flag: multiply 8-bit activations (precision "q4a8"), as in q4kernel.cpp

_loaded: dict[str, object] = {}


def cpu_supported() -> bool:
    """True when the CPU runs one of the kernel's builds: AVX512-BF16, or AVX2 with FMA and F16C
    (Linux /proc/cpuinfo)."""
    return kernels.isa() is not None


def build_dir() -> Path:
    """Where the built kernel lives: one folder per source, torch version, compiler and flags."""
    return kernels.build_dir("q4", SOURCE, FLAGS)


def load() -> object | None:
    """The compiled kernel module, or None (with a one-time warning saying why) when q4 mode has
    to use torch's int4 kernel instead."""
    if "module" in _loaded:
        return _loaded["module"]
    module, why = None, None
    if os.environ.get("VERIDRAFT_Q4_KERNEL", "").lower() == "aten":
        why = ""  # asked for: no warning
    elif not cpu_supported():
        why = "this CPU has neither AVX512-BF16 nor AVX2 with FMA and F16C"
    else:
        try:
            module = _build()
        except Exception as e:  # compiler missing or failing: q4 still works, slower
            why = f"building it failed ({str(e).strip().splitlines()[-1][:200]})"
    if why:
        warnings.warn(
            f"q4 mode uses torch's int4 kernel: {why}; its forwards over several tokens cost "
            "several one-token forwards (docs/performance/amd-epyc-zen5.md)",
            stacklevel=3,
        )
    _loaded["module"] = module
    return module


@contextlib.contextmanager
def disabled():
    """Within the block, q4 linears are built on torch's int4 kernel (as on a CPU without this
    one): for benchmarks that compare the two on one machine."""
    saved = dict(_loaded)
    _loaded["module"] = None
    try:
        yield
    finally:
        _loaded.clear()
        _loaded.update(saved)


def a8_supported() -> bool:
    """True when precision "q4a8" can run: the kernel's AVX512 build (which needs AVX512-VNNI
    besides AVX512-BF16) is loaded."""
    return kernels.isa() == "avx512bf16" and load() is not None


def _build():
    """Import the built kernel, building it first when this machine has none (kernels.build)."""
    return kernels.build("q4", SOURCE, FLAGS, "q4 mode's CPU kernel")


def layout(top: int) -> int:
    """The code layout for codes up to `top`: 4-bit pairs, plus one or two bit masks, or signed
    bytes."""
    return NIB if top <= 15 else NIB5 if top <= 31 else NIB6 if top <= 63 else INT8


def _fp16_exact(*arrays: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        return all(np.array_equal(a.astype(np.float16).astype(np.float32), a) for a in arrays)


def pack(u: np.ndarray, s: np.ndarray, z: np.ndarray, group: int, two_level=None):
    """Codes u (uint8 [N, K]) with float32 scale s and zero z ([N, K/group]), weight = u * s + z,
    -> (layout, scale layout, codes, sa, sb) as q4kernel.cpp reads them. `two_level` = (D, c,
    M, m), D and M float32 [N, K/256], c and m integers [N, K/group] with s = D * c and z = M * m
    (K-quants): stored so, 0.09 bytes per weight instead of 0.25. Otherwise s and z go as
    float16 where that holds them exactly, else float32."""
    n, k = u.shape
    nb, ng = n // 16, k // group
    if n % 16 or k % 32 or k % group:
        raise ValueError(f"a {n} x {k} matrix does not tile into 16 outputs x {group} inputs")
    top = int(u.max()) if u.size else 0
    # [nb, ng, G/2 k-pairs, 16 outputs, 2] -> one 32-element vector per k-pair
    v = u.reshape(nb, 16, ng, group // 2, 2).transpose(0, 2, 3, 1, 4).reshape(nb, ng, -1, 32)
    s, z = s.astype(np.float32), z.astype(np.float32)
    mode = layout(top)
    if mode == NIB:
        v = v.reshape(nb, ng, group // 4, 2, 32)
        codes = v[:, :, :, 0] | (v[:, :, :, 1] << 4)
    elif mode in (NIB5, NIB6):
        # low nibbles as NIB, then per vector a 32-bit mask of bit 4 (and of bit 5 for 6 bits)
        lo = (v & 15).reshape(nb, ng, group // 4, 2, 32)
        nib = (lo[:, :, :, 0] | (lo[:, :, :, 1] << 4)).reshape(nb, ng, -1)
        bits = [(v >> 4) & 1] if mode == NIB5 else [(v >> 4) & 1, (v >> 5) & 1]
        masks = np.stack([np.packbits(b, axis=-1, bitorder="little") for b in bits], axis=3)
        codes = np.concatenate((nib, masks.reshape(nb, ng, -1)), axis=2)
    else:  # signed bytes u - 128; the zero takes the 128 s
        codes = (v.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        z = (z + np.float32(128) * s).astype(np.float32)

    def tiles(a: np.ndarray, dtype) -> torch.Tensor:  # [N, X] -> [nb, X, 16]
        x = a.reshape(nb, 16, -1).transpose(0, 2, 1)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=dtype))

    codes = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8).reshape(nb, ng, -1))
    if two_level is not None and mode != INT8 and k % 256 == 0:
        d, c, m_, mm = (np.asarray(t) for t in two_level)
        d, m_ = d.astype(np.float32), m_.astype(np.float32)
        c8, mm8 = c.astype(np.int8), mm.astype(np.int8)
        per = 256 // group
        same = np.array_equal(np.repeat(d, per, 1) * c8.astype(np.float32), s) and np.array_equal(
            np.repeat(m_, per, 1) * mm8.astype(np.float32), z
        )
        if same:
            sa = torch.stack((tiles(d, np.float32), tiles(m_, np.float32)), 2)
            sb = torch.stack((tiles(c8, np.int8), tiles(mm8, np.int8)), 2)
            return mode, K2, codes, sa.contiguous(), sb.contiguous()
    if _fp16_exact(s, z):
        return mode, F16, codes, tiles(s, np.float16), tiles(z, np.float16)
    return mode, F32, codes, tiles(s, np.float32), tiles(z, np.float32)
