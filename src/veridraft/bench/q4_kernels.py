"""`python -m veridraft.bench.q4_kernels`: q4 mode's two kernels side by side, interleaved in one
process: milliseconds of a target forward over T new tokens after 100 cached positions, with
veridraft's kernel (models/q4kernel.cpp) and with torch's int4 kernel, per catalog model, and the
bytes of weights each reads per token. Where the CPU runs it, q4a8 (the same kernel, 8-bit
activations) is a third row. Medians over the rounds after two of warm-up; the order
of T alternates round by round.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from ..models import from_folder, kernels, q4kernel
from ..models.catalog import pull
from ..models.precision import weight_nbytes_per_token

TS = (1, 2, 4, 8, 12, 17)  # 12: a verification of 11 drafts (one q4a8 tile)
CONTEXT = 100


def _load_all(name: str) -> dict:
    """The model in q4 with each kernel (the choice is made when a linear is built), and in q4a8
    where the CPU runs it."""
    folder = pull(name)
    own = from_folder(folder, "q4")
    if q4kernel.load() is None:
        raise SystemExit("veridraft's q4 kernel is not available here (see the warning)")
    a8 = from_folder(folder, "q4a8") if q4kernel.a8_supported() else None
    with q4kernel.disabled():
        aten = from_folder(folder, "q4")
    nets = {"veridraft": own, "torch-int4": aten}
    if a8 is not None:
        nets["veridraft q4a8"] = a8
    return nets


def measure(name: str, rounds: int = 10, ts=TS) -> list[dict]:
    nets = _load_all(name)
    ids = torch.randint(100, 1000, (CONTEXT + max(ts),), generator=torch.Generator().manual_seed(0))
    times = {(k, t): [] for k in nets for t in ts}
    with torch.inference_mode():
        caches = {}
        for k, net in nets.items():
            caches[k] = net.new_cache(CONTEXT + max(ts) + 1)
            net(ids[:CONTEXT], caches[k])
        for r in range(rounds + 2):
            for t in ts if r % 2 else ts[::-1]:
                for k, net in nets.items():
                    caches[k].truncate(CONTEXT)
                    start = time.perf_counter()
                    net(ids[CONTEXT : CONTEXT + t], caches[k])
                    if r >= 2:
                        times[k, t].append((time.perf_counter() - start) * 1e3)
    rows = []
    for k, net in nets.items():
        ms = {t: statistics.median(times[k, t]) for t in ts}
        rows.append(
            {"model": name, "kernel": k, "mb": weight_nbytes_per_token(net) / 1e6, "ms": ms}
        )
    del nets, caches
    gc.collect()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m veridraft.bench.q4_kernels", description=__doc__)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cols = " | ".join(f"T={t}" for t in TS)
    print(
        f"{kernels.cpu_name()}, {args.threads} threads; veridraft's kernel: {kernels.isa()} build"
    )
    print(f"| model | kernel | MB read per token | {cols} | T=8 / T=1 | T=17 / T=1 |")
    print("|---|---|--:|" + "--:|" * (len(TS) + 2))
    for name in args.models:
        for row in measure(name, args.rounds):
            ms = row["ms"]
            cells = " | ".join(f"{ms[t]:.1f}" for t in TS)
            print(
                f"| {name} | {row['kernel']} | {row['mb']:.0f} | {cells} | "
                f"{ms[8] / ms[1]:.2f} | {ms[17] / ms[1]:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
