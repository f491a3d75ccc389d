"""Where the time of one model-drafter round goes: target and draft forwards, and the drafter's
own loop, timed interleaved in one process after warm-up (medians of `REPEATS`).

    python draft_cost.py [TARGET] [DRAFT] [PRECISION]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from veridraft.decode import DecodeContext
from veridraft.drafters import make_drafter
from veridraft.loader import load
from veridraft.models.precision import PackedLinear
from veridraft.sampling import SamplingParams

DEFAULTS = ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "bf16"]
TARGET, DRAFT, PREC = (sys.argv[1:] + DEFAULTS[len(sys.argv) - 1 :])[:3]
REPEATS, CTX, K = 5, 300, 12
torch.set_num_threads(2)
torch.set_grad_enabled(False)
target = load(TARGET, precision=PREC)
draft = load(DRAFT, precision=PREC)
ids = list(range(1000, 1000 + CTX))


def fwd(net, t: int):
    cache = net.new_cache(CTX + 64)
    net(torch.tensor(ids), cache, num_logits=1)

    def run():
        cache.truncate(CTX)
        net(torch.tensor(ids[:t]), cache, num_logits=t)

    return run


def floors(net, on: bool):
    for m in net.modules():
        if isinstance(m, PackedLinear) and not on:
            m._floor, m._floor_threads = 1, torch.get_num_threads()
        elif isinstance(m, PackedLinear):
            m._floor_threads = 0  # re-read the measured floor on the next call


drafter = make_drafter(f"model:{DRAFT}:mode=fixed,k={K}", target)
tcache = target.net.new_cache(CTX + 64)
ctx = DecodeContext(
    ids=list(ids),
    prompt_len=CTX,
    target=target.net,
    cache=tcache,
    sampling=SamplingParams(),
    generator=torch.Generator().manual_seed(0),
    max_new_tokens=64,
)
drafter.prefill(ctx)


def propose():
    drafter.propose(ctx, K)
    drafter.update(0, 0)


cases = {
    "target T=1": fwd(target.net, 1),
    f"target T={K + 1}": fwd(target.net, K + 1),
    "draft T=1 (full head)": fwd(draft.net, 1),
    f"drafter propose k={K}, per token": propose,
}
times: dict[str, list[float]] = {c: [] for c in cases}
for rep in range(REPEATS + 2):
    for name, fn in cases.items():
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if rep >= 2:
            times[name].append(dt / (K if name.startswith("drafter") else 1))
base = statistics.median(times["target T=1"])
print(f"{TARGET} <- {DRAFT}, {PREC}, context {CTX}, 2 threads; ms (x target T=1)")
for name, ts in times.items():
    m = statistics.median(ts)
    print(f"  {name:<32} {1000 * m:8.1f} ms  {m / base:5.2f}x")
floors(draft.net, False)
ts = []
for _ in range(REPEATS):
    f = fwd(draft.net, 1)
    t0 = time.perf_counter()
    f()
    ts.append(time.perf_counter() - t0)
print(f"  {'draft T=1, no row floor':<32} {1000 * statistics.median(ts):8.1f} ms")
