"""Long-context benchmark of the KV-compression presses (lossy), on the retrieval set.

    python -m veridraft.bench.kv --model smollm2-135m --context 8k --n 5 \\
        --budgets 0.1,0.25,0.5 --compose ngram,layerskip --out docs/benchmarks/kv-smollm2-8k.json

Per item the prompt is prefilled once on a full cache (in plain decoding's chunks), with every
attention statistic the presses read captured along the way; each press then compresses a copy of that cache, so
prefill time is not what is compared. Per item, interleaved: plain decoding on the full cache
(the reference), each press x budget, then the drafters composed with the compressed target
(`--compose-kv`, default: the press with the best agreement at the smallest budget) and with
the full target. Figures: KV memory held (the compacted cache's buffers in the cache's own
element type, room for the new tokens included), decode tokens/s (after the first token), token agreement with the full
model's greedy ids, first divergence, retrieval accuracy (exact digit match).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ..data.retrieval import make_set, score
from ..decode import Prefill, decode
from ..defaults import DEFAULT_MODEL
from ..drafters import forget_earlier_generations, make_drafter
from ..generate import draft_env
from ..loader import load
from ..models.base import Capture
from ..models.kernels import cpu_name
from ..presses import PRESSES, full_kv_bytes, make_press, prefill_capture
from ..sampling import SamplingParams
from .environment import loadavg
from .fidelity import first_divergence, token_agreement

MAX_DRAFT = 16


def _run(net, ids, pre, tok, drafter=None, max_new=32) -> dict:
    new, st = decode(
        net,
        ids,
        max_new_tokens=max_new,
        sampling=SamplingParams(),
        generator=torch.Generator().manual_seed(0),
        drafter=drafter,
        prefilled=pre,
        max_draft=MAX_DRAFT,
    )
    dec = st.total_s - st.prefill_s
    return {
        "ids": new,
        "text": tok.decode(new, skip_special_tokens=True),
        "decode_tok_s": (len(new) - 1) / dec if dec > 0 and len(new) > 1 else None,
        "tau": st.tau,
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = load(args.model, precision=args.precision)
    net, tok = model.net, model.tokenizer
    env = draft_env(model)
    items = make_set(tok, context=args.context, n=args.n, tasks=(args.task,), seed=args.seed)
    specs = [
        f"{p}:budget={b}" for p in args.presses.split(",") for b in args.budgets.split(",") if p
    ]
    presses = {s: make_press(s) for s in specs}
    drafts = [d for d in args.compose.split(",") if d]
    compose_kv = args.compose_kv
    rows: dict[str, list[dict]] = {}
    args.loads = [loadavg()]  # the 1-minute load average at the start and after each item

    def add(name: str, item, out: dict, kv_bytes: int, ref: dict | None) -> None:
        out = {**out, "item": item.id, "kv_bytes": kv_bytes}
        out["accuracy"] = score(out["text"], item)
        if ref is not None:
            out["agreement"] = token_agreement(out["ids"], ref["ids"])
            out["first_divergence"] = first_divergence(out["ids"], ref["ids"])
        rows.setdefault(name, []).append(out)
        print(
            f"{item.id} {name}: acc {out['accuracy']:.2f} agree "
            f"{out.get('agreement', 1.0):.2f} tok/s {out['decode_tok_s'] or 0:.2f} "
            f"KV {kv_bytes / 2**20:.1f} MB",
            flush=True,
        )

    for item in items:
        ids = tok.encode(item.prompt)
        room = args.max_new_tokens + MAX_DRAFT + 1
        cap = Capture(press_rows=32, press_colsum=any(p.colsum for p in presses.values()))
        t0 = time.perf_counter()
        with torch.no_grad():
            full, cap, logits = prefill_capture(net, ids, len(ids) + room, cap)
            logits = logits.clone()
        print(f"{item.id}: {len(ids)} tokens prefilled in {time.perf_counter() - t0:.1f}s")
        pre_full = Prefill(ids, full, logits)
        full_bytes = full_kv_bytes(net, len(ids) + room)
        # warm-up, then the reference
        _run(net, ids, pre_full, tok, max_new=4)
        ref = _run(net, ids, pre_full, tok, max_new=args.max_new_tokens)
        add("ar", item, ref, full_bytes, None)
        compressed = {}
        for spec, press in presses.items():
            full.truncate(len(ids))
            with torch.no_grad():
                cc = press.compress(net, full, cap, room)
            out = _run(net, ids, Prefill(ids, cc, logits), tok, max_new=args.max_new_tokens)
            add(f"ar+kv:{spec}", item, out, cc.nbytes(), ref)
            out_tier = cc.tier_bytes()
            if out_tier:
                rows[f"ar+kv:{spec}"][-1]["tier_bytes"] = out_tier
            compressed[spec] = cc if spec == compose_kv else None
        for d in drafts:
            # neither run drafts from the other's answer to this prompt (SuffixDecoding's
            # global trie, Token Recycling's table outlive a generation)
            forget_earlier_generations()
            out = _run(
                net, ids, pre_full, tok, make_drafter(d, model, env=env), args.max_new_tokens
            )
            add(d, item, out, full_bytes, ref)
            if compose_kv:
                cc = compressed.get(compose_kv)
                if cc is None:
                    full.truncate(len(ids))
                    with torch.no_grad():
                        cc = make_press(compose_kv).compress(net, full, cap, room)
                forget_earlier_generations()
                drafter = make_drafter(d, model, env=env)
                out = _run(net, ids, Prefill(ids, cc, logits), tok, drafter, args.max_new_tokens)
                add(f"{d}+kv:{compose_kv}", item, out, cc.nbytes(), ref)
        del full, cap, compressed
        args.loads.append(loadavg())
        if args.on_item is not None:
            args.on_item(summarize(args, rows, len(items)))
    return summarize(args, rows, len(items))


def summarize(args: argparse.Namespace, rows: dict[str, list[dict]], n_items: int) -> dict:
    """Means over the items done so far."""
    table = {}
    ar_speed = statistics.mean(r["decode_tok_s"] for r in rows["ar"])
    for name, rs in rows.items():
        tps = [r["decode_tok_s"] for r in rs if r["decode_tok_s"]]
        own = rows.get(f"ar+kv:{name.split('+kv:', 1)[1]}") if "+kv:" in name else None
        own_speed = statistics.mean(r["decode_tok_s"] for r in own) if own else None
        mean_tps = statistics.mean(tps) if tps else None
        table[name] = {
            "lossy": name != "ar" and "+kv:" in name,
            "kv_mb": statistics.mean(r["kv_bytes"] for r in rs) / 2**20,
            "kv_ratio": statistics.mean(rows["ar"][0]["kv_bytes"] / r["kv_bytes"] for r in rs),
            "decode_tok_s": mean_tps,
            "speedup_vs_full_ar": mean_tps / ar_speed if mean_tps else None,
            "speedup_vs_compressed_ar": mean_tps / own_speed if own_speed and mean_tps else None,
            "agreement": statistics.mean(r.get("agreement", 1.0) for r in rs),
            "accuracy": statistics.mean(r["accuracy"] for r in rs),
            "tau": statistics.mean(r["tau"] for r in rs),
        }
    return {
        "command": args.command,
        "model": args.model,
        "precision": args.precision,
        "context": args.context,
        "task": args.task,
        "items": len(rows["ar"]),
        "items_planned": n_items,
        "max_new_tokens": args.max_new_tokens,
        "cpu": cpu_name(),
        "threads": args.threads,
        "load_average": [x[0] for x in getattr(args, "loads", []) if x],
        "table": table,
        "rows": {
            k: [{kk: vv for kk, vv in r.items() if kk != "ids"} for r in v] for k, v in rows.items()
        },
    }


def _load_note(res: dict) -> str:
    """What the load average says about the run's tokens/s (older results carry a note)."""
    loads = res.get("load_average")
    if not loads:
        return res.get("note", "load average not recorded")
    return (
        f"1-minute load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs "
        "during the run (the run itself counts); ratios measured in this run are the figures "
        "to compare"
    )


def markdown(res: dict) -> str:
    lines = [
        f"# KV-cache compression (lossy) at {res['context']} tokens: {res['model']}",
        "",
        f"`{res['command']}`",
        "",
        f"{res['items']} retrieval items ({res['task']}), {res['max_new_tokens']} new tokens, greedy; "
        f"{res.get('precision', 'fp32')}, {res['cpu']}, {res['threads']} threads, "
        f"{_load_note(res)}. Every `+kv:` row is **lossy**: "
        "agreement is the share of generated positions equal to the full model's greedy ids.",
        "",
        "| method | KV MB held | KV ÷ | decode tok/s | vs full ar | vs own compressed ar | "
        "agreement | retrieval acc | τ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt):
        return "–" if x is None else format(x, fmt)

    for name, e in res["table"].items():
        label = f"`{name}`" + (" (lossy)" if e["lossy"] else "")
        lines.append(
            f"| {label} | {e['kv_mb']:.1f} | {e['kv_ratio']:.1f} | {f(e['decode_tok_s'], '.2f')} | "
            f"{f(e['speedup_vs_full_ar'], '.2f')}x | {f(e['speedup_vs_compressed_ar'], '.2f')} | "
            f"{100 * e['agreement']:.1f}% | {100 * e['accuracy']:.0f}% | {e['tau']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m veridraft.bench.kv", description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--precision", default="fp32", help="fp32, fp16w, bf16, q4, q4a8")
    p.add_argument("--context", default="8k")
    p.add_argument("--n", type=int, default=5, help="retrieval items")
    p.add_argument("--task", default="single")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--presses", default=",".join(PRESSES))
    p.add_argument("--budgets", default="0.1,0.25,0.5")
    p.add_argument("--compose", default="ngram,layerskip", help="drafters to run on the targets")
    p.add_argument("--compose-kv", default="snapkv:budget=0.1")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, help="results .json (a .md report beside it)")
    args = p.parse_args(argv)
    import sys

    args.command = "python -m veridraft.bench.kv " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(res: dict) -> None:  # after every item: a long run leaves its figures so far
        out.write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(markdown(res))

    args.on_item = save
    res = run(args)
    save(res)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
