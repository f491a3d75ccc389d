"""`python -m veridraft.bench.attn_rows`: the decode attention kernel (models/attnkernel.cpp)
alone over a bfloat16 cache, for the shapes verification and prompt attention run, against a
reference build of another source of it (``--reference``: a file, e.g. the copy the tests keep in
tests/models/attnkernel_reference.cpp), interleaved in one process after a warm-up, medians of
the repeats.

Figures: ms per call (one layer), G multiply-adds/s (scores and values: 2 x n_h x keys x hd per
row) and that as a fraction of vdpbf16ps' peak on the threads, measured here by a loop of
independent vdpbf16ps (32 multiply-adds each) compiled with the same flags. Every call of the
two builds is also compared: the outputs must be bitwise equal.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ..home import home
from ..models import attnkernel, kernels

# name: (query heads, kv heads, head_dim, rows, context, rows' start); start None: a chain of
# rows ending at the context (a verification forward); else prompt rows from `start`
SHAPES = {
    "qwen2.5-coder-1.5b": [
        (12, 2, 128, t, ctx, None) for ctx in (1024, 4096, 8192) for t in (1, 8, 16)
    ],
    "smollm2-135m": [(9, 3, 64, 8, 8192, None), (9, 3, 64, 64, 8192, 8192 - 64)],
}

PEAK_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
// independent vdpbf16ps chains, register operands only: the instruction's throughput
double run(int64_t iters) {
    std::vector<float> sink(64 * 16);
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            __m512 a[12];
            for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(float(i + t));
            __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80 + int(t));
            __m512bh y = (__m512bh)_mm512_set1_epi32(0x3f803f81);
            for (int64_t n = 0; n < iters; ++n)
                for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbf16_ps(a[i], x, y);
            for (int i = 0; i < 12; ++i) _mm512_storeu_ps(&sink[(t % 64) * 16], a[i]);
        }
    });
    return sink[0];
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run); }
"""


def clock():
    """The timer: on one thread that thread's CPU time (the kernel runs on the calling thread
    then, so time the machine's other work takes from it is not counted), else wall time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def peak_gmacs(repeats: int = 5) -> float:
    """vdpbf16ps' throughput on the current threads, G multiply-adds/s (best of the repeats)."""
    src = home() / "kernels" / "bench-bf16-peak.cpp"
    src.parent.mkdir(parents=True, exist_ok=True)
    if not src.is_file() or src.read_text() != PEAK_SOURCE:
        src.write_text(PEAK_SOURCE)
    mod = kernels.build("bf16peak", src, kernels.FLAGS, "a vdpbf16ps throughput loop")
    iters = 2_000_000
    mod.run(iters // 10)
    best = float("inf")
    now = clock()
    for _ in range(repeats):
        t = now()
        mod.run(iters)
        best = min(best, now() - t)
    return torch.get_num_threads() * iters * 12 * 32 / best / 1e9


def case(n_h, n_kv, hd, rows, ctx, start, layers, seed=0):
    """Inputs of `layers` calls (distinct caches, so that each call reads its own) and the
    multiply-adds of one call."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_h, rows, hd, generator=g)
    if start is None:
        hi = torch.arange(ctx - rows + 1, ctx + 1)
    else:
        hi = torch.arange(start + 1, start + rows + 1)
    lo = torch.zeros(rows, dtype=torch.long)
    caches = [
        (
            torch.randn(1, n_kv, ctx, hd, generator=g).to(torch.bfloat16),
            torch.randn(1, n_kv, ctx, hd, generator=g).to(torch.bfloat16),
        )
        for _ in range(layers)
    ]
    macs = 2 * n_h * hd * int((hi - lo).sum())
    return q, lo, hi, caches, macs


def compare(new, ref, shapes, layers: int, repeats: int, peak: float) -> list[dict]:
    out = []
    for n_h, n_kv, hd, rows, ctx, start in shapes:
        q, lo, hi, caches, macs = case(n_h, n_kv, hd, rows, ctx, start, layers)
        scale = hd**-0.5
        mods = {"new": new} if ref is None else {"ref": ref, "new": new}
        results = {}
        for name, m in mods.items():  # warm-up, and the outputs compared
            results[name] = [m.rows(q, k, v, lo, hi, None, scale, 0.0) for k, v in caches]
        same = ref is None or all(torch.equal(a, b) for a, b in zip(results["ref"], results["new"]))
        times: dict[str, list[float]] = {n: [] for n in mods}
        now = clock()
        for _ in range(repeats):
            for name, m in mods.items():
                t = now()
                for k, v in caches:
                    m.rows(q, k, v, lo, hi, None, scale, 0.0)
                times[name].append((now() - t) / layers)
        row = {
            "shape": f"{n_h}/{n_kv}x{hd} T={rows} @{ctx}"
            + (" prompt" if start is not None else ""),
            "bitwise": same,
        }
        for name, ts in times.items():
            s = statistics.median(ts)
            row[name] = (1000 * s, macs / s / 1e9, macs / s / 1e9 / peak)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m veridraft.bench.attn_rows")
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="another source of attnkernel.cpp to time against (default: none)",
    )
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=4, help="distinct caches per sample")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if not kernels.cpu_supported():
        raise SystemExit("this CPU has no AVX512-BF16: the kernel does not run here")
    if a.reference is not None and not a.reference.is_file():
        raise SystemExit(f"--reference {a.reference}: no such file; name a copy of attnkernel.cpp")
    torch.set_num_threads(a.threads)
    new = attnkernel.load()
    ref = None
    if a.reference is not None:
        ref = kernels.build("attnref", a.reference, kernels.FLAGS, "the reference attention kernel")
    peak = peak_gmacs()
    print(
        f"{kernels.cpu_name()}, {a.threads} threads; vdpbf16ps peak {peak:.0f} G multiply-adds/s; "
        f"bfloat16 cache; ms per call (one layer), median of {a.repeats}; "
        + ("the thread's CPU time" if a.threads == 1 else "wall time")
    )
    print(
        "| shape | "
        + ("reference ms | G/s | peak | " if ref else "")
        + "ms | G/s | peak |"
        + (" new / ref | bitwise |" if ref else "")
    )
    for model in a.models:
        print(f"| {model} |")
        for r in compare(new, ref, SHAPES[model], a.layers, a.repeats, peak):
            cells = [r["shape"]]
            for name in ("ref", "new") if ref else ("new",):
                ms, g, f = r[name]
                cells += [f"{ms:.3f}", f"{g:.0f}", f"{100 * f:.0f}%"]
            if ref:
                cells += [f"{r['new'][0] / r['ref'][0]:.3f}", "yes" if r["bitwise"] else "NO"]
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
