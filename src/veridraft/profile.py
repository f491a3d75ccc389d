"""`veridraft profile`: measure the cost model (veridraft.costmodel) of a model on this machine.

    veridraft profile --model smollm2-135m [--precision fp16w] [--threads 2]

Times a target forward over T = 1, 2, 4, 8, 16 new tokens at a short (100) and a long (1000)
context (interleaved over T, after warm-up; medians), one step of each drafter (ngram lookup,
layerskip draft forward, the model drafter's forward with the first layers), stores the result
next to the model (see costmodel.cost_paths) and prints it with the speedup speculative decoding
would give at acceptance rates 0.5-0.9 and the best draft length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime

import torch

from .costmodel import CostModel, load_cost, machine_id, save_cost

TS = (1, 2, 4, 8, 16)
CONTEXTS = (100, 1000)
ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def forward_costs(net, ts=TS, contexts=CONTEXTS, repeats: int = 7, warmup: int = 2, seed: int = 0):
    """{context: {T: median ms}} for target forwards over T new tokens after `context` cached
    positions. Contexts longer than the model's window are clipped."""
    gen = torch.Generator().manual_seed(seed)
    vocab = net.config.vocab_size
    limit = int(net.config.max_position_embeddings) - max(ts) - 1
    out: dict[int, dict[int, float]] = {}
    with torch.inference_mode():
        for ctx in contexts:
            ctx = max(1, min(ctx, limit))
            cache = net.new_cache(ctx + max(ts) + 1)
            net(torch.randint(0, vocab, (ctx,), generator=gen), cache, num_logits=1)
            toks = {t: torch.randint(0, vocab, (t,), generator=gen) for t in ts}
            times: dict[int, list[float]] = {t: [] for t in ts}
            for r in range(warmup + repeats):
                for t in ts if r % 2 == 0 else reversed(ts):
                    s = time.perf_counter()
                    net(toks[t], cache)
                    dt = time.perf_counter() - s
                    cache.truncate(ctx)
                    if r >= warmup:
                        times[t].append(dt)
            out[ctx] = {t: _median_ms(v) for t, v in times.items()}
    return out


def draft_costs(model, context: int = 100, repeats: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median ms of one step of each built-in drafter at `context` cached positions."""
    from .drafters import make_drafter
    from .drafters.base import DecodeContext
    from .drafters.model import truncate_layers
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
            skip = make_drafter("layerskip", model).skip
        tok = torch.tensor([ids[-1]])

        def layerskip_step() -> None:
            start = cache.length
            net(tok, cache, skip=skip)
            cache.truncate(start)

        out["layerskip"] = timed(layerskip_step)

        n = min(8, max(1, n_layers // 3))
        small = truncate_layers(net, n)
        dcache = small.new_cache(context + 32)
        small(torch.tensor(ids[:-1]), dcache, num_logits=1)

        def model_step() -> None:
            start = dcache.length
            small(tok, dcache)
            dcache.truncate(start)

        out["model"] = timed(model_step)
        out["model_layers"] = float(n)
    return out


def measure(model, repeats: int = 7, contexts=CONTEXTS, ts=TS, command: str = "") -> CostModel:
    net = model.net
    threads = torch.get_num_threads()
    fwd = forward_costs(net, ts, contexts, repeats)
    drafts = draft_costs(model, context=min(fwd), repeats=repeats)
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return CostModel(
        model=model.name,
        precision=model.precision,
        machine=machine_id(threads),
        threads=threads,
        forward_ms=fwd,
        draft_ms=drafts,
        cpu=f"{cpu} ({threads} threads)",
        torch=torch.__version__,
        command=command,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
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
    short = min(cost.forward_ms)
    lines += ["", f"draft step, ms (fraction of a one-token target forward at context {short}):"]
    drafters = [d for d in ("ngram", "layerskip", "model") if d in cost.draft_ms]
    for d in drafters:
        extra = f", first {int(cost.draft_ms['model_layers'])} layers" if d == "model" else ""
        lines.append(f"  {d:<10} {cost.draft_ms[d]:8.2f} ms  ({cost.draft_cost(d):.3f}{extra})")
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


def _run(args: argparse.Namespace) -> int:
    from .loader import load

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model, precision=args.precision)
    if args.show:
        cost = load_cost(model)
        if cost is None:
            print(f"no cost profile for {model.name} ({model.precision}) on this machine")
            return 1
    else:
        cmd = f"veridraft profile --model {args.model} --precision {args.precision}"
        cmd += f" --threads {torch.get_num_threads()} --repeats {args.repeats}"
        cost = measure(model, repeats=args.repeats, command=cmd)
        if not args.no_save:
            path = save_cost(model, cost)
            print(f"saved {path}", file=sys.stderr)
    print(report(cost))
    return 0


def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile",
        help="measure forward and draft costs on this machine (the cost model)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", "-m", default="smollm2-135m", help="catalog name, GGUF or folder")
    p.add_argument("--precision", default="fp32", help="fp32 | fp16w (default fp32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per point (default 7)")
    p.add_argument("--no-save", action="store_true", help="print only, do not store the file")
    p.add_argument("--show", action="store_true", help="print the stored profile, measure nothing")
    p.set_defaults(func=_run)
    return p
