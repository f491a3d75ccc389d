"""`veridraft profile`: measure the cost model (veridraft.costmodel) of a model on this machine.

    veridraft profile --model smollm2-135m [--precision fp16w] [--threads 2]

Times a target forward over T = 1, 2, 4, 8, 16, 32 new tokens at a short (100) and a long (1000)
context (interleaved over T, after warm-up; medians), next to what this machine bounds each at:
the bytes it reads at the measured copy bandwidth and its weight matmuls' multiply-adds at the
model's own matmul kernel's in-cache rate, and the floor that the peak of the instruction those
matmuls multiply with sets (models/peak.py); one step of each drafter - the drafter's own
`propose` for one token, so its draft head (the subset head by default) and bookkeeping count:
ngram lookup, the default layerskip drafter, a model drafter on the target's first layers.
Universal drafting has no stored figure (its cost is its draft model's, unknown here):
`--stats` then uses the draft time the generation measured. Stores the result
next to the model (see costmodel.cost_paths) and prints it with the speedup speculative decoding
would give at acceptance rates 0.5-0.9 and the best draft length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from datetime import UTC, datetime

import torch

from .costmodel import CostModel, machine_id
from .models.kernels import cpu_name
from .tree import tree_attn

TS = (1, 2, 4, 8, 16, 32)
CONTEXTS = (100, 1000)
ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


class ForwardTimer:
    """Prefilled caches at each context; `round()` times one forward per T (in alternating
    order) and rolls the cache back. Several timers can be interleaved round by round."""

    def __init__(self, net, ts=TS, contexts=CONTEXTS, seed: int = 0, tree: bool = False) -> None:
        gen = torch.Generator().manual_seed(seed)
        vocab = net.config.vocab_size
        limit = int(net.config.max_position_embeddings) - max(ts) - 1
        self.net, self.ts = net, tuple(ts)
        self.caches = {}
        with torch.inference_mode():
            for ctx in contexts:
                ctx = max(1, min(ctx, limit))
                cache = net.new_cache(ctx + max(ts) + 1)
                net(torch.randint(0, vocab, (ctx,), generator=gen), cache, num_logits=1)
                self.caches[ctx] = cache
        self.toks = {t: torch.randint(0, vocab, (t,), generator=gen) for t in ts}
        # tree=True: the T rows are a root and a 3-ary token tree (Token Recycling's and
        # SuffixDecoding's trees are bushy near the root), verified with tree attention
        self.trees = {t: tree_attn(bushy(t - 1)) for t in ts if tree and t > 1}
        self.times = {c: {t: [] for t in ts} for c in self.caches}
        self.rounds = 0

    def round(self, record: bool = True) -> None:
        order = self.ts if self.rounds % 2 == 0 else tuple(reversed(self.ts))
        self.rounds += 1
        with torch.inference_mode():
            for ctx, cache in self.caches.items():
                for t in order:
                    s = time.perf_counter()
                    self.net(self.toks[t], cache, tree=self.trees.get(t))
                    dt = time.perf_counter() - s
                    cache.truncate(ctx)
                    if record:
                        self.times[ctx][t].append(dt)

    def medians_ms(self) -> dict[int, dict[int, float]]:
        return {c: {t: _median_ms(v) for t, v in row.items()} for c, row in self.times.items()}


def bushy(n: int) -> list[int]:
    """Parents of an n-node tree in which every node has up to 3 children, breadth first."""
    return [i // 3 - 1 for i in range(n)]


def forward_costs(
    net,
    ts=TS,
    contexts=CONTEXTS,
    repeats: int = 7,
    warmup: int = 2,
    seed: int = 0,
    tree: bool = False,
):
    """{context: {T: median ms}} for target forwards over T new tokens after `context` cached
    positions (tree=True: a root and T - 1 token-tree nodes). Contexts longer than the model's
    window are clipped."""
    timer = ForwardTimer(net, ts, contexts, seed, tree=tree)
    for r in range(warmup + repeats):
        timer.round(record=r >= warmup)
    return timer.medians_ms()


def draft_costs(model, context: int = 100, repeats: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median ms of one step of each built-in drafter at `context` cached positions."""
    from .draft import DecodeContext
    from .drafters import make_drafter
    from .drafters.model import ModelDrafter, truncate_layers
    from .sampling import SamplingParams

    net = getattr(model, "net", model)
    vocab, n_layers = net.config.vocab_size, net.config.n_layers
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (context,), generator=gen).tolist()
    out: dict[str, float] = {}

    def timed(fn) -> float:
        ts = []
        for r in range(warmup + repeats):
            s = time.perf_counter()
            fn()
            if r >= warmup:
                ts.append(time.perf_counter() - s)
        return _median_ms(ts)

    with torch.inference_mode():
        cache = net.new_cache(context + 32)
        net(torch.tensor(ids[:-1]), cache, num_logits=1)
        ctx = DecodeContext(
            ids=list(ids),
            prompt_len=len(ids),
            target=net,
            cache=cache,
            sampling=SamplingParams(),
            generator=torch.Generator().manual_seed(0),
        )
        ngram = make_drafter("ngram:num_tokens=8", model)
        ngram.prefill(ctx)

        def ngram_step() -> None:  # one new id per round, as in decoding
            ctx.ids.append(ctx.ids[-(context // 2)])
            ngram.propose(ctx, 8)

        out["ngram"] = timed(ngram_step)
        del ctx.ids[context:]

        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the heuristic skip set's note
            # the default drafter (tuned profile or default skip set, default draft head); one
            # propose of one token is one draft step, cache rolled back, as in decoding
            layerskip = make_drafter("layerskip:num_tokens=1,adaptive=false", model)
        layerskip.prefill(ctx)
        out["layerskip"] = timed(lambda: layerskip.propose(ctx, 1))
        out[layerskip.cost_key] = out["layerskip"]

        n = min(8, max(1, n_layers // 3))
        label = f"model:{getattr(model, 'name', None) or 'target'}-l{n}"
        small = ModelDrafter(
            truncate_layers(net, n), mode="fixed", num_tokens=1, label=label, target_vocab=vocab
        )
        small.prefill(ctx)
        # each propose re-runs the last id and drafts one token: one draft-model step
        out["model"] = timed(lambda: small.propose(ctx, 1))
        out[small.cost_key] = out["model"]
        out["model_layers"] = float(n)
    return out


def stable_bandwidth(rounds: int = 5, megabytes: int = 256) -> float:
    """Copy bandwidth in bytes/s, the best of `rounds` measurements (each the best of 7 copies):
    on a shared machine one round can read well below what the memory delivers, so a single
    round's figure moves between runs; the best of several is the one that repeats."""
    from .bench.ar_speed import copy_bandwidth

    return max(copy_bandwidth(megabytes) for _ in range(rounds))


def _linears(net) -> list:
    from .models.precision import PackedLinear
    from .models.q4 import Q4Linear

    return [m for m in net.modules() if isinstance(m, Q4Linear | PackedLinear | torch.nn.Linear)]


def matmul_macs(net) -> int:
    """Multiply-adds of the weight matmuls per row (every linear, the head included; tied
    weights once per use, as the forward runs them)."""
    return sum(m.in_features * m.out_features for m in _linears(net))


def matmul_rate(net, rows: int = 64, outputs: int = 512, calls: int = 20, repeats: int = 7):
    """Multiply-adds/s of the model's own matmul kernel with its weights in cache: the first
    `outputs` outputs of its first linear (a view for q4 and q4a8, so the same kernel and layout)
    over `rows` rows, the best of `repeats` runs of `calls` calls (a packed float linear, which
    has no view: its smallest linear whole). The compute bound of a forward: what the kernel's
    instruction mix reaches once the weights' bytes are not the limit. None without linears."""
    from .models.q4 import Q4Linear

    view = lin = None
    for lin in _linears(net):  # the first that gives a view (a fused linear's parts may not)
        n = min(outputs, lin.out_features)
        if isinstance(lin, Q4Linear):
            view = lin.rows_view(0, n - n % 16) if n >= 16 else None
        elif type(lin) is torch.nn.Linear:
            view = torch.nn.Linear(lin.in_features, n, bias=False, dtype=lin.weight.dtype)
            view.weight.data.copy_(lin.weight.data[:n])
        if view is not None:
            break
    if view is None:
        lins = _linears(net)
        if not lins:
            return None
        lin = view = min(lins, key=lambda m: m.in_features * m.out_features)
    n = view.out_features
    dtype = lin.weight.dtype if type(lin) is torch.nn.Linear else torch.float32
    x = torch.randn(rows, lin.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        view(x)
        for _ in range(repeats):
            s = time.perf_counter()
            for _ in range(calls):
                view(x)
            best = min(best, time.perf_counter() - s)
    return rows * n * lin.in_features * calls / best


def instruction_peak(precision: str) -> tuple[str | None, float]:
    """The instruction the precision's matmuls multiply with here, and its measured peak in G
    multiply-adds/s on the current threads (0.0 where it cannot be measured)."""
    from .models import peak

    name = peak.instruction_for(precision)
    if name is None:
        return None, 0.0
    try:
        return name, peak.peak_gmacs(name)
    except Exception as e:  # no compiler: the profile goes on without this line
        print(f"veridraft: {name}'s peak not measured ({e})", file=sys.stderr)
        return name, 0.0


def bounds_ms(net, ts, contexts, bandwidth: float, rate: float | None):
    """{context: {T: (bytes-bound ms, compute-bound ms or None)}}: the weights and the cache's
    keys and values read once, at `bandwidth` bytes/s; T rows of the weight matmuls'
    multiply-adds at `rate` per second (attention's are not counted)."""
    from .bench.ar_speed import kv_bytes_per_position
    from .models.precision import weight_nbytes_per_token

    weights, kv, macs = weight_nbytes_per_token(net), kv_bytes_per_position(net), matmul_macs(net)
    return {
        c: {
            t: (
                (weights + kv * (c + t)) / bandwidth * 1e3,
                t * macs / rate * 1e3 if rate else None,
            )
            for t in ts
        }
        for c in contexts
    }


def measure(model, repeats: int = 7, contexts=CONTEXTS, ts=TS, command: str = "") -> CostModel:
    net = model.net
    threads = torch.get_num_threads()
    fwd = forward_costs(net, ts, contexts, repeats)
    bandwidth, rate = stable_bandwidth(), matmul_rate(net)
    instruction, peak = instruction_peak(model.precision)
    bounds = bounds_ms(net, ts, fwd, bandwidth, rate)
    trees = forward_costs(net, ts, contexts[:1], repeats, tree=True)
    drafts = draft_costs(model, context=min(fwd), repeats=repeats)
    cpu = cpu_name()
    return CostModel(
        model=model.name,
        precision=model.precision,
        machine=machine_id(threads),
        threads=threads,
        forward_ms=fwd,
        tree_ms=trees,
        draft_ms=drafts,
        bytes_bound_ms={c: {t: b[0] for t, b in row.items()} for c, row in bounds.items()},
        compute_bound_ms={
            c: {t: b[1] for t, b in row.items() if b[1] is not None} for c, row in bounds.items()
        },
        bandwidth_GBps=bandwidth / 1e9,
        matmul_GMACs=(rate or 0.0) / 1e9,
        peak_instruction=instruction or "",
        peak_GMACs=peak,
        cpu=f"{cpu} ({threads} threads)",
        torch=torch.__version__,
        command=command,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


# kernels that multiply weights: everything else in a step is "outside the matmuls"
_MATMUL_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::fbgemm_linear_fp16_weight_fp32_activation",
    "mkldnn::_linear_pointwise",
    "aten::_weight_int4pack_mm_for_cpu",
    "veridraft::q4_linear",  # q4 mode's own kernel, named for the profiler by _named_q4_kernel
    "aten::_weight_int8pack_mm",
)


@contextmanager
def _named_q4_kernel():
    """q4 mode's own kernel is a plain extension call that torch.profiler does not record: name
    it for the profiled steps (its self time then counts as matmul time, as aten::mm's does)."""
    from .models.q4 import Q4Linear

    forward = Q4Linear.forward

    def named(self, x):
        with torch.profiler.record_function("veridraft::q4_linear"):
            return forward(self, x)

    Q4Linear.forward = named
    try:
        yield
    finally:
        Q4Linear.forward = forward


def _profiled_step(net, tok, cache, context: int, n: int = 5) -> tuple[float, float, float]:
    """Per one-token step under torch.profiler: total and weight-matmul self CPU time (us) and
    ATen calls."""
    from torch.profiler import ProfilerActivity, profile

    with _named_q4_kernel(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            net(tok, cache)
            cache.truncate(context)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in _MATMUL_OPS)
    ops = sum(e.count for e in events if "::" in e.key)
    return total / n, mm / n, ops / n


def _linears_ms(net, repeats: int = 7) -> float:
    """Median ms of one row through every linear of the model in turn: the weight matmuls of a
    one-token step, timed on their own (the fused forward's are out of the profiler's sight)."""
    from .models.q4 import Q4Linear

    lins = [m for m in net.modules() if isinstance(m, Q4Linear)]
    xs = [torch.randn(1, m.in_features) for m in lins]
    times = []
    for i in range(repeats + 2):
        s = time.perf_counter()
        for m, x in zip(lins, xs):
            m(x)
        if i >= 2:
            times.append(time.perf_counter() - s)
    return _median_ms(times)


def step_accounting(net, context: int = 100, steps: int = 20, bandwidth: float | None = None):
    """Where a one-token step at `context` cached positions goes: median ms, ATen calls per
    step, the share of the step's profiled CPU time outside the weight matmuls, the bytes it
    reads (weights + KV), the copy-bandwidth bound on it and the share of that bound reached.

    A model on the fused forward (models/fused.py) runs its matmuls inside one C++ call that
    the profiler cannot see into: their time is then that of one row through each of its
    linears in turn (with each call's Python overhead, so the share outside them, the rest of
    the fused step's time, is if anything understated)."""
    from .bench.ar_speed import kv_bytes_per_position
    from .models.precision import weight_nbytes_per_token

    bw = bandwidth if bandwidth is not None else stable_bandwidth()
    gen = torch.Generator().manual_seed(0)
    tok = torch.randint(0, net.config.vocab_size, (1,), generator=gen)
    times = []
    fused = getattr(net, "fused", None)
    with torch.inference_mode():
        cache = net.new_cache(context + 2)
        net(torch.randint(0, net.config.vocab_size, (context,), generator=gen), cache)
        for i in range(steps + 3):
            s = time.perf_counter()
            net(tok, cache)
            if i >= 3:
                times.append(time.perf_counter() - s)
            cache.truncate(context)
        total, mm, ops = _profiled_step(net, tok, cache, context)
        if fused is not None:
            mm = _linears_ms(net) * 1e3
    nbytes = weight_nbytes_per_token(net) + kv_bytes_per_position(net) * context
    ms = _median_ms(times)
    bound_ms = nbytes / bw * 1e3
    if fused is not None:
        outside = min(1.0, max(0.0, 1 - mm / 1e3 / ms))
    else:
        outside = 1 - mm / total if total else 0.0
    return {
        "ms": ms,
        "aten_ops": ops,
        "outside_matmuls": outside,
        "fused": fused is not None,
        "bytes": nbytes,
        "bandwidth_GBps": bw / 1e9,
        "bound_ms": bound_ms,
        "share_of_bound": bound_ms / ms,
    }


def accounting_line(acc: dict, context: int = 100) -> str:
    return (
        f"one-token step at context {context}"
        f"{' (fused forward)' if acc.get('fused') else ''}: {acc['ms']:.1f} ms, "
        f"{acc['aten_ops']:.0f} "
        f"ATen calls, {100 * acc['outside_matmuls']:.0f}% of it outside the weight matmuls; "
        f"reads {acc['bytes'] / 1e6:.0f} MB (weights + KV): {acc['bound_ms']:.1f} ms at the "
        f"copy bandwidth ({acc['bandwidth_GBps']:.1f} GB/s), {100 * acc['share_of_bound']:.0f}% "
        "of that bound reached"
    )


def report(cost: CostModel) -> str:
    lines = [
        f"cost model: {cost.model}, {cost.precision}, {cost.cpu}, torch {cost.torch}",
        "",
        "target forward, ms (median) and cost(T)/cost(1):",
    ]
    ts = sorted(next(iter(cost.forward_ms.values())))
    lines.append("context " + "".join(f"{'T=' + str(t):>16}" for t in ts))
    for c, row in sorted(cost.forward_ms.items()):
        cells = "".join(f"{row[t]:9.1f} (x{row[t] / row[ts[0]]:.2f})" for t in ts)
        lines.append(f"{c:>7} {cells}")
    if cost.bytes_bound_ms:
        lines += [
            "",
            f"bounds, ms: bytes read at the copy bandwidth ({cost.bandwidth_GBps:.1f} GB/s, best "
            "of 5) / the weight matmuls' multiply-adds at the matmul kernel's in-cache rate "
            f"({cost.matmul_GMACs:.0f} G/s; attention's not counted), and the share of the "
            "larger bound reached:",
            "context " + "".join(f"{'T=' + str(t):>16}" for t in ts),
        ]
        for c, row in sorted(cost.forward_ms.items()):
            cells = ""
            for t in ts:
                b = cost.bytes_bound_ms.get(c, {}).get(t)
                k = cost.compute_bound_ms.get(c, {}).get(t)
                if b is None:
                    cells += f"{'-':>16}"
                    continue
                top = max(b, k or 0.0)
                cell = f"{b:.0f}/{'-' if k is None else f'{k:.0f}'} {100 * top / row[t]:.0f}%"
                cells += f"{cell:>16}"
            lines.append(f"{c:>7} {cells}")
    if cost.peak_GMACs and cost.compute_bound_ms:
        lines += peak_lines(cost, ts)
    short = min(cost.forward_ms)
    lines += ["", f"draft step, ms (fraction of a one-token target forward at context {short}):"]
    drafters = [d for d in ("ngram", "layerskip", "model") if d in cost.draft_ms]
    for d in drafters:
        extra = f", first {int(cost.draft_ms['model_layers'])} layers" if d == "model" else ""
        lines.append(f"  {d:<10} {cost.draft_ms[d]:8.2f} ms  ({cost.draft_cost(d):.3f}{extra})")
    lines.append("  universal  no figure (its draft model's; --stats uses the measured draft time)")
    lines += [
        "",
        "expected speedup over plain decoding at the best k (context "
        f"{short}; tokens per round sum alpha^i, i=0..k, / ((cost(k+1) + k draft) / cost(1))):",
        "alpha     " + "".join(f"{d:>18}" for d in drafters),
    ]
    for a in ALPHAS:
        cells = ""
        for d in drafters:
            dc = cost.draft_cost(d) or 0.0
            k = cost.best_k(a, dc)
            cell = f"x{cost.speedup(a, k, dc):.2f} (k={k})"
            cells += f"{cell:>18}"
        lines.append(f"{a:<10}" + cells)
    lines += ["", "break-even acceptance (speedup 1.0) at k = 2, 4, 8:"]
    for d in drafters:
        dc = cost.draft_cost(d) or 0.0
        be = [cost.break_even_alpha(k, dc) for k in (2, 4, 8)]
        lines.append(f"  {d:<10} " + "  ".join("never" if b is None else f"{b:.2f}" for b in be))
    return "\n".join(lines)


def peak_lines(cost: CostModel, ts: list[int]) -> list[str]:
    """What the instruction's peak allows: the matmul kernel's in-cache rate as a share of it,
    and per T the larger of the bytes bound and T rows of multiply-adds at the peak, over the
    measured one-token forward (the floor no kernel of this arithmetic goes below)."""
    c = min(cost.compute_bound_ms)
    share = cost.matmul_GMACs / cost.peak_GMACs
    lines = [
        "",
        f"{cost.peak_instruction}'s peak here: {cost.peak_GMACs:.0f} G multiply-adds/s (a loop "
        f"of independent instructions on the same threads); the matmul kernel in cache reaches "
        f"{100 * share:.0f}% of it. At that peak (context {c}), ms and x the measured T=1:",
        "        " + "".join(f"{'T=' + str(t):>16}" for t in ts),
    ]
    one = cost.forward_ms[c][ts[0]]
    cells = ""
    for t in ts:
        b = cost.bytes_bound_ms.get(c, {}).get(t)
        k = cost.compute_bound_ms.get(c, {}).get(t)
        if b is None or k is None:
            cells += f"{'-':>16}"
            continue
        floor = max(b, k * share)
        cells += f"{f'{floor:.0f} (x{floor / one:.2f})':>16}"
    return lines + ["floor   " + cells]


# ---- docs/performance/: python -m veridraft.profile [--models ...] [--precisions ...] ----


def performance_table(
    models=("smollm2-135m", "gemma3-270m"),
    precisions=("fp32", "fp16w", "bf16"),
    repeats: int = 7,
    prompts: int = 4,
    new_tokens: int = 64,
) -> str:
    """Markdown: per model and precision, ms per forward over T at contexts 100 and 1000 (the
    precisions interleaved round by round; medians), plain-decoding tokens/s (precisions
    interleaved per prompt; median over prompts) and the memory-bandwidth bound."""
    from .bench.ar_speed import SAMPLE_PROMPTS, kv_bytes_per_position
    from .generate import generate_ids, prompt_ids_for
    from .loader import load
    from .models.precision import weight_nbytes_per_token

    out = []
    bw = stable_bandwidth()
    for name in models:
        loaded = {p: load(name, precision=p) for p in precisions}
        timers = {p: ForwardTimer(m.net) for p, m in loaded.items()}
        for i in range(2 + repeats):
            for p in precisions if i % 2 == 0 else tuple(reversed(precisions)):
                timers[p].round(record=i >= 2)
        first = loaded[precisions[0]]
        ids_list = [
            prompt_ids_for(first, [{"role": "user", "content": SAMPLE_PROMPTS[j]}])
            for j in range(prompts)
        ]
        rates: dict[str, list[float]] = {p: [] for p in precisions}
        ctx_seen: list[float] = []
        for j, ids in enumerate([ids_list[0], *ids_list]):  # the first run is a warm-up
            for p in precisions if j % 2 == 0 else tuple(reversed(precisions)):
                t = time.perf_counter()
                new, _ = generate_ids(loaded[p], ids, max_new_tokens=new_tokens, seed=0)
                if j:
                    rates[p].append(len(new) / (time.perf_counter() - t))
                    ctx_seen.append(len(ids) + len(new) / 2)
        mean_ctx = statistics.mean(ctx_seen)
        acc = {p: step_accounting(loaded[p].net, bandwidth=bw) for p in precisions}
        out.append(f"### {name}\n")
        out.append("| precision | context | " + " | ".join(f"T={t}" for t in TS) + " | T=8 / T=1 |")
        out.append("|---|---|" + "---|" * len(TS) + "---|")
        for p in precisions:
            for c, row in timers[p].medians_ms().items():
                out.append(
                    f"| {p} | {c} | "
                    + " | ".join(f"{row[t]:.1f}" for t in TS)
                    + f" | {row[8] / row[1]:.2f} |"
                )
        out.append("")
        out.append(
            "| precision | plain decoding tok/s (median) | weights read per token | "
            "bandwidth bound tok/s | share of bound | one-token step: ATen calls, "
            "outside the matmuls |"
        )
        out.append("|---|---|---|---|---|---|")
        for p in precisions:
            net = loaded[p].net
            per_tok = weight_nbytes_per_token(net) + kv_bytes_per_position(net) * mean_ctx
            bound = bw / per_tok
            med = statistics.median(rates[p])
            out.append(
                f"| {p} | {med:.1f} | {weight_nbytes_per_token(net) / 1e6:.0f} MB | "
                f"{bound:.1f} | {100 * med / bound:.0f}% | {acc[p]['aten_ops']:.0f}, "
                f"{100 * acc[p]['outside_matmuls']:.0f}% |"
            )
        out.append(
            f"\n(copy bandwidth {bw / 1e9:.1f} GB/s, STREAM convention; mean context "
            f"{mean_ctx:.0f} tokens; {prompts} prompts x {new_tokens} new tokens; "
            f"{torch.get_num_threads()} threads)\n"
        )
        if len(precisions) > 1:
            short = {p: timers[p].medians_ms()[min(timers[p].caches)] for p in precisions}
            out.append(
                precision_advice({p: statistics.median(r) for p, r in rates.items()}, short) + "\n"
            )
        print("\n".join(out[-(2 * len(precisions) + 14) :]), file=sys.stderr, flush=True)
        del loaded, timers
    return "\n".join(out)


def precision_advice(plain: dict[str, float], cost: dict[str, dict[int, float]], t: int = 4) -> str:
    """Which precision this machine favours: the fastest plain decoding (tokens/s per mode), and
    the mode whose forward over `t` tokens costs least relative to one (ms per T, per mode) - the
    best CPU mode differs between machines (docs/precision.md)."""
    fastest = max(plain, key=plain.get)
    ratio = {p: c[t] / c[1] for p, c in cost.items()}
    flattest = min(ratio, key=ratio.get)
    rates = ", ".join(f"{p} {plain[p]:.1f}" for p in sorted(plain, key=plain.get, reverse=True))
    flat = ", ".join(f"{p} {ratio[p]:.2f}x" for p in sorted(ratio, key=ratio.get))
    line = (
        f"On this machine {fastest} decodes fastest (tok/s: {rates}); a forward over {t} tokens "
        f"costs least, relative to one, in {flattest} ({flat})."
    )
    if fastest != flattest:
        line += (
            f" Drafters gain the larger ratio in {flattest}, from a slower start: bench a "
            "method in both (--precision) to see which gives more tokens/s."
        )
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m veridraft.profile",
        description="the performance table of docs/performance/",
    )
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16w", "bf16"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(
        performance_table(a.models, a.precisions, a.repeats, a.prompts, a.new_tokens),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
