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

from ..models import attnkernel, kernels
from ..models.peak import peak_gmacs

# name: (query heads, kv heads, head_dim, rows, context, rows' start); start None: a chain of
# rows ending at the context (a verification forward); else prompt rows from `start`
SHAPES = {
    "qwen2.5-coder-1.5b": [
        (12, 2, 128, t, ctx, None) for ctx in (1024, 4096, 8192) for t in (1, 8, 16)
    ],
    "smollm2-135m": [(9, 3, 64, 8, 8192, None), (9, 3, 64, 64, 8192, 8192 - 64)],
}


def clock():
    """The timer: on one thread that thread's CPU time (the kernel runs on the calling thread
    then, so time the machine's other work takes from it is not counted), else wall time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


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
    peak = peak_gmacs("vdpbf16ps")
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
