"""`python -m veridraft.bench.fused`: the fused forward (models/fused.py) against q4's Python
layers, interleaved in one process: milliseconds of a target forward over T new tokens after a
prefilled context, per catalog model and mode (q4, q4a8), on the same loaded model with its
fused forward on and off (both compute the same logits bit for bit). Medians over the rounds
after two of warm-up; the order of T and of the two paths alternates round by round.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from ..models import fused, kernels, q4kernel
from ..models.precision import weight_nbytes_per_token

TS = (1, 2, 4, 8, 12, 16)


def measure(name: str, precision: str, rounds: int = 12, ts=TS, context: int = 100) -> list[dict]:
    """[{"path": "fused" | "python", "ms": {T: ms}, "mb": weight MB per token}] for one model."""
    from ..loader import load

    net = load(name, precision=precision).net
    if not fused.uses_fused(net):
        raise SystemExit(f"{name} in {precision} has no fused forward here (models/fused.py)")
    keep = net.fused
    gen = torch.Generator().manual_seed(0)
    vocab = net.config.vocab_size
    cache = net.new_cache(context + max(ts) + 1)
    ids = torch.randint(0, vocab, (max(ts),), generator=gen)
    times = {(p, t): [] for p in ("fused", "python") for t in ts}
    try:
        with torch.inference_mode():
            net(torch.randint(0, vocab, (context,), generator=gen), cache)
            for r in range(rounds + 2):
                for p in ("fused", "python") if r % 2 else ("python", "fused"):
                    net.fused = keep if p == "fused" else None
                    for t in ts if r % 2 else ts[::-1]:
                        start = time.perf_counter()
                        net(ids[:t], cache)
                        if r >= 2:
                            times[p, t].append((time.perf_counter() - start) * 1e3)
                        cache.truncate(context)
    finally:
        net.fused = keep
    mb = weight_nbytes_per_token(net) / 1e6
    rows = [
        {"path": p, "ms": {t: statistics.median(times[p, t]) for t in ts}, "mb": mb}
        for p in ("fused", "python")
    ]
    del net, cache
    gc.collect()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m veridraft.bench.fused", description=__doc__)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--precisions", nargs="+", default=["q4", "q4a8"])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if fused.load() is None:
        raise SystemExit("the fused forward is not available here (it needs AVX512-BF16)")
    precisions = [p for p in args.precisions if p != "q4a8" or q4kernel.a8_supported()]
    cols = " | ".join(f"T={t}" for t in TS)
    print(f"{kernels.cpu_name()}, {args.threads} threads, context {args.context}; ms per forward")
    print(f"| model | mode | path | MB per token | {cols} | T=8 / T=1 |")
    print("|---|---|---|--:|" + "--:|" * (len(TS) + 1))
    for name in args.models:
        for precision in precisions:
            for row in measure(name, precision, args.rounds, context=args.context):
                ms = row["ms"]
                cells = " | ".join(f"{ms[t]:.2f}" for t in TS)
                print(
                    f"| {name} | {precision} | {row['path']} | {row['mb']:.0f} | {cells} | "
                    f"{ms[8] / ms[1]:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
