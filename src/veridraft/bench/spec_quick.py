"""Quick speculative-decoding benchmark: tau, alpha and speedup vs plain decoding per drafter.

    python -m veridraft.bench.spec_quick                       # smollm2-135m, 5 per group
    python -m veridraft.bench.spec_quick --methods ar,ngram,layerskip:attn=8-20 --per-group 2

Protocol (Spec-Bench): batch size 1, greedy, first turn of each question
(chat template when the model has one), up to --max-new-tokens, stopping at EOS; one process,
torch threads fixed; a warm-up run per method; then for each question every method runs once, in
an order rotated per question (interleaved), so slow drifts of the machine hit all methods alike.
Per-question tokens/s = new tokens / wall time of the whole generation (prefill included);
speedup = mean tokens/s of the method / mean tokens/s of plain decoding (Spec-Bench's ratio of
means), per task group and overall. tau counts the bonus token (plain = 1.00); alpha = accepted /
drafted, pooled over questions. Every output is checked against plain decoding's ids.

One drafter instance per method serves all questions, so adaptive state carries over as in the
papers (layerskip's gamma, the model drafter's confidence threshold). This is a quick check, not
the full harness (`veridraft bench`), which adds peers, repeats and reports.

Also the tool used to hand-pick the default layerskip sets: list candidate skip sets as methods
and compare their speedups on a few questions per group.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from ..defaults import DEFAULT_MODEL
from ..errors import VeridraftError
from ..generate import generate_ids, prompt_ids_for
from ..sampling import SamplingParams
from .methods import split_methods
from .questions import SPEC_BENCH_GROUPS, default_questions_path, load_questions, select

DEFAULT_METHODS = "ar,ngram,layerskip,model:{model}-l8"


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run(
    model_name: str,
    methods: list[str],
    per_group: int,
    max_new_tokens: int,
    threads: int,
    questions_path: str | None = None,
    max_prompt_tokens: int | None = None,
    precision: str = "fp32",
    log=print,
) -> dict:
    from ..drafters import make_drafter
    from ..loader import load

    torch.set_num_threads(threads)
    model = load(model_name, precision=precision)
    qs = select(load_questions(questions_path or default_questions_path()), limit=per_group)
    tok = model.tokenizer
    prompts = []
    for q in qs:
        text = q.turns[0]
        body = tok.encode(text, add_special_tokens=False)
        if max_prompt_tokens and len(body) > max_prompt_tokens:
            # keep the head (instruction, document start) and the tail (a trailing question)
            head, tail = (2 * max_prompt_tokens) // 3, max_prompt_tokens // 3
            text = tok.decode(body[:head]) + " ... " + tok.decode(body[-tail:])
        prompts.append(prompt_ids_for(model, [{"role": "user", "content": text}]))
    drafters = {m: (None if m == "ar" else make_drafter(m, model)) for m in methods}
    greedy = SamplingParams()

    def one(method: str, ids: list[int], n: int):
        t0 = time.perf_counter()
        new, stats = generate_ids(
            model, ids, max_new_tokens=n, sampling=greedy, seed=0, draft=drafters[method]
        )
        return new, stats, time.perf_counter() - t0

    log(
        f"# {model_name} ({precision}): {len(qs)} questions, {max_new_tokens} new tokens, "
        f"{threads} threads"
    )
    log(f"load average before: {_loadavg()}")
    warm = prompts[0][:64]
    for m in methods:  # warm-up (also fills the rope tables and allocator pools)
        one(m, warm, 16)
    records: list[dict] = []
    t_start = time.perf_counter()
    for i, (q, ids) in enumerate(zip(qs, prompts)):
        order = methods[i % len(methods) :] + methods[: i % len(methods)]
        row = {}
        for m in order:
            new, stats, wall = one(m, ids, max_new_tokens)
            row[m] = (new, stats, wall)
        ref = row["ar"][0] if "ar" in row else None
        for m in methods:
            new, stats, wall = row[m]
            records.append(
                dict(
                    method=m,
                    qid=q.question_id,
                    group=q.group,
                    prompt_tokens=len(ids),
                    new_tokens=len(new),
                    wall_s=wall,
                    tps=len(new) / wall if wall > 0 else 0.0,
                    drafted=stats.drafted,
                    accepted=stats.accepted,
                    forwards=stats.target_forwards,
                    emitted=stats.emitted_in_rounds,
                    draft_s=stats.draft_s,
                    verify_s=stats.verify_s,
                    exact=(ref is None or new == ref),
                )
            )
        done = ", ".join(f"{m} {row[m][0].__len__() / row[m][2]:.1f}" for m in methods)
        log(f"  [{i + 1}/{len(qs)}] {q.group} q{q.question_id} ({len(ids)} tokens): {done} tok/s")
    log(f"load average after: {_loadavg()} ({time.perf_counter() - t_start:.0f} s)")
    res = summarize(records, methods, model_name, threads, max_new_tokens)
    res["precision"] = precision
    return res


def _agg(recs: list[dict], base: list[dict] | None) -> dict:
    tps = statistics.fmean(r["tps"] for r in recs)
    out = {
        "questions": len(recs),
        "tokens_per_s": tps,
        "tau": sum(r["emitted"] for r in recs) / max(1, sum(r["forwards"] for r in recs)),
        "alpha": (
            sum(r["accepted"] for r in recs) / sum(r["drafted"] for r in recs)
            if sum(r["drafted"] for r in recs)
            else None
        ),
        "exact_match": f"{sum(r['exact'] for r in recs)}/{len(recs)}",
        "draft_share": sum(r["draft_s"] for r in recs) / max(1e-9, sum(r["wall_s"] for r in recs)),
    }
    if base:
        out["speedup"] = tps / statistics.fmean(r["tps"] for r in base)
    return out


def summarize(records, methods, model_name, threads, max_new_tokens) -> dict:
    groups = [g for g in SPEC_BENCH_GROUPS if any(r["group"] == g for r in records)]
    groups += sorted({r["group"] for r in records} - set(groups))
    res: dict = {
        "model": model_name,
        "threads": threads,
        "max_new_tokens": max_new_tokens,
        "methods": {},
        "records": records,
    }
    for m in methods:
        mine = [r for r in records if r["method"] == m]
        base = [r for r in records if r["method"] == "ar"] or None
        entry = {"overall": _agg(mine, base)}
        for g in groups:
            gm = [r for r in mine if r["group"] == g]
            gb = [r for r in base if r["group"] == g] if base else None
            entry[g] = _agg(gm, gb)
        res["methods"][m] = entry
    res["groups"] = groups
    return res


def table(res: dict) -> str:
    groups = res["groups"]
    head = "| method | tok/s | speedup | tau | alpha | exact | draft time | " + " | ".join(groups)
    lines = [head + " |", "|" + "---|" * (7 + len(groups))]
    for m, e in res["methods"].items():
        o = e["overall"]
        alpha = "-" if o["alpha"] is None else f"{o['alpha']:.2f}"
        per = " | ".join(f"{e[g].get('speedup', 1.0):.2f}x" for g in groups)
        lines.append(
            f"| {m} | {o['tokens_per_s']:.1f} | {o.get('speedup', 1.0):.2f}x | {o['tau']:.2f} | "
            f"{alpha} | {o['exact_match']} | {100 * o['draft_share']:.0f}% | {per} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m veridraft.bench.spec_quick", description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--methods",
        default=None,
        help=f'comma- or "|"-separated; default "{DEFAULT_METHODS}"',
    )
    p.add_argument("--per-group", type=int, default=5, help="questions per task group")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32", help="fp32 (default) or another mode")
    p.add_argument("--questions", default=None, help="Spec-Bench-format JSONL file")
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="trim longer question texts to about this many tokens (head and tail kept)",
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    try:
        # "|" separates methods too, so candidate skip sets read as written
        methods = split_methods(
            (args.methods or DEFAULT_METHODS.format(model=args.model)).split("|")
        )
        if "ar" not in methods:
            methods.insert(0, "ar")
        res = run(
            args.model,
            methods,
            args.per_group,
            args.max_new_tokens,
            args.threads,
            args.questions,
            args.max_prompt_tokens,
            args.precision,
        )
    except VeridraftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
