"""`run_bench`: one whole benchmark run, from a model and a method list to results.json,
report.md and speedup.png."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import VeridraftError
from ..generate import prompt_ids_for
from ..loader import load
from ..profiles import recorded_path
from . import humaneval, long, passk
from .ar_speed import bandwidth_bound
from .base import DEFAULT_METHODS, PEER_ENGINES
from .environment import environment, loadavg
from .fidelity import add_fidelity
from .memory import peak_rss_mb
from .methods import make_method, split_methods
from .metrics import mean_of, summarize
from .protocol import Protocol, run_protocol
from .questions import default_questions_path, load_questions, select
from .report import write_all

SUITES = ("spec-bench", "humaneval", "retrieval", "long")


def default_out_dir(model_name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(model_name)).name or "model")
    return Path("out") / f"bench-{safe}-{stamp}"


def run_bench(
    model,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    questions: str | Path | None = None,
    *,
    limit: int | None = None,
    groups: Sequence[str] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    repeats: int = 1,
    warmup: int = 1,
    out: str | Path | None = None,
    threads: int = 2,
    seed: int = 0,
    progress: bool = True,
    bandwidth: bool = True,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    precision: str = "fp32",
    suite: str = "spec-bench",
    split: str = "even",
    context: str | Sequence[int] | None = None,
    tasks: str | Sequence[str] | None = None,
) -> dict:
    """Benchmark `methods` on `model` (a catalog name, path, or a loaded model); write
    results.json, report.md and speedup.png into `out` (None: no files). Returns the results.

    suite "spec-bench" reads `questions` (a Spec-Bench-format file); "humaneval" uses the
    HumanEval problems of `split` (even | odd | all) and adds pass@1 per method; "long" builds
    the long-document tasks (bench/long.py) at the `context` lengths from `questions` (default
    shared/data/long/austen.jsonl) and adds prefill and KV figures per context length."""
    log = log or (lambda s: print(s, file=sys.stderr))
    if repeats < 1:
        raise VeridraftError(f"--repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise VeridraftError(f"--warmup must be >= 0, got {warmup}")
    if max_new_tokens < 1:
        raise VeridraftError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if threads < 1:
        raise VeridraftError(f"--threads must be at least 1, got {threads}")
    names = split_methods(methods)
    peer = tuple(f"{e}:" for e in PEER_ENGINES)
    if "ar" not in names and any(not n.startswith(peer) for n in names):
        log("adding method 'ar' (veridraft plain decoding): speedups and exact match need it")
        names.insert(0, "ar")
    suite, _, suite_arg = suite.partition(":")
    if suite not in SUITES:
        raise VeridraftError(f"unknown --suite {suite!r}; choose one of {', '.join(SUITES)}")
    if isinstance(model, str | Path) and suite == "retrieval":
        model = load(str(model), precision=precision)
    items = None
    if suite == "retrieval":  # the lossy methods' task accuracy next to their speed
        qpath, all_q, items = retrieval_questions(model, questions, suite_arg, limit, seed, log)
        limit = None  # the file or the generated set is the selection
        gen = min(it.gen_tokens for it in items.values())
        if max_new_tokens > gen:
            log(f"retrieval: max new tokens {max_new_tokens} -> {gen} (the items' answer budget)")
            max_new_tokens = gen
    elif suite == "humaneval":
        if questions:
            raise VeridraftError("--questions and --suite humaneval exclude each other: drop one")
        qpath = humaneval.data_path()
        all_q = humaneval.questions(split, qpath)
    elif suite == "long":
        qpath = Path(questions) if questions else long.default_data_path()
        books = long.load_books(qpath)
        contexts = long.parse_context(context or long.DEFAULT_CONTEXTS)
        long_tasks = long.parse_tasks(tasks or long.DEFAULT_TASKS)
    else:
        qpath = Path(questions) if questions else default_questions_path()
        all_q = load_questions(qpath)

    torch.set_num_threads(threads)
    if isinstance(model, str | Path):
        model = load(str(model), precision=precision)
    raw_ids: dict[str, list[int]] = {}
    if suite == "long":
        tk = model.tokenizer
        all_q, raw_ids = long.build_tasks(
            books,
            tk.encode,
            lambda ids: tk.decode(ids, skip_special_tokens=True),
            lambda msgs: prompt_ids_for(model, msgs),
            contexts=contexts,
            tasks=long_tasks,
            max_new_tokens=max_new_tokens,
            context_limit=getattr(model, "context_length", None),
            chat=bool(tk.has_chat_template),
            limit=limit,
            log=log,
        )
        limit = None  # long: --limit is the number of chapters summarised
    chosen = select(all_q, list(groups) if groups else None, limit)
    meths = [make_method(n, model, threads=threads) for n in names]
    load_peak_mb = peak_rss_mb(True)  # models of every method loaded: the run's resident floor
    tok = model.tokenizer
    prot = Protocol(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        repeats=repeats,
        warmup=warmup,
        seed=seed,
        progress=progress,
        log=log,
    )
    n_gen = repeats * sum(len(q.turns) for q in chosen)
    log(
        f"benchmark: {model.name}, {len(chosen)} questions ({n_gen} generations per method) "
        f"from {qpath}, methods {', '.join(names)}, {max_new_tokens} new tokens max, "
        f"{threads} threads"
    )
    load_start = loadavg()
    ncpu = os.cpu_count() or 1
    if load_start and load_start[0] > max(1.0, ncpu - threads + 0.5):
        log(
            f"warning: load average {load_start[0]:.1f} on {ncpu} CPUs: other processes are "
            "competing for the cores, so absolute timings will be slow and noisy (interleaving "
            "keeps the ratios comparable, but a quiet machine gives better figures)"
        )
    partial = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        partial = Path(out) / "records.partial.jsonl"
        partial.write_text("")
        log(f"records are appended to {partial} as they come")

        def save(rec: dict, path=partial) -> None:
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")

        prot.on_record = save
    t_start = time.perf_counter()
    try:
        records = run_protocol(
            chosen,
            meths,
            # retrieval prompts are completion-style raw text, for base and chat models alike;
            # long-suite continuations are raw book text, pre-tokenised
            encode=lambda msgs: (
                tok.encode(msgs[-1]["content"])
                if suite == "retrieval"
                else raw_ids[msgs[0]["content"]]
                if len(msgs) == 1 and msgs[0]["content"] in raw_ids
                else prompt_ids_for(model, msgs)
            ),
            decode_text=lambda ids: tok.decode(ids, skip_special_tokens=True),
            protocol=prot,
        )
    finally:
        for m in meths:
            m.close()
    elapsed = time.perf_counter() - t_start
    info = {m.name: m.info() for m in meths}
    if suite == "humaneval":
        log("running the unit tests of every answer (pass@1)")
        passk.score_records(records, {str(q.question_id): q.extra["humaneval"] for q in chosen})
    summary = summarize(records, info)
    if suite == "humaneval":
        for table in summary["table"].values():
            for name, entry in table.items():
                if not entry.get("skipped"):
                    entry["pass_at_1"] = passk.pass_at_1(records, name)  # one group: all
    score = None
    if items is not None:
        from ..data.retrieval import score as retrieval_score

        def score(rec: dict) -> float | None:
            it = items.get(str(rec["question_id"]))
            return None if it is None else retrieval_score(rec.get("text") or "", it)

    add_fidelity(summary, records, "ar", score=score)
    env = environment(threads, command)
    env["load_average_start"] = load_start
    bound = None
    if bandwidth:
        ok = [r for r in records if r["method"] == "ar" and not r.get("error")]
        ctx = mean_of(r["prompt_tokens"] + r["new_tokens"] / 2 for r in ok) or max_new_tokens
        bound = bandwidth_bound(model.net, ctx)
    results = {
        "format": "veridraft-bench/1",
        "model": {
            "name": model.name,
            "path": recorded_path(str(getattr(model, "path", ""))),
            "precision": getattr(model, "precision", None),
        },
        "settings": {
            "suite": suite + (f":{suite_arg}" if suite_arg else ""),
            "split": split if suite == "humaneval" else None,
            "questions_file": recorded_path(str(qpath)),
            "questions": len(chosen),
            "question_ids": [q.question_id for q in chosen],
            "limit": limit,
            "groups": list(groups) if groups else None,
            "methods": names,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "repeats": repeats,
            "warmup": warmup,
            "seed": seed,
            "threads": threads,
            "elapsed_s": elapsed,
        },
        "environment": env,
        "peak_rss_after_load_mb": load_peak_mb,
        "bandwidth_bound": bound,
        "methods": info,
        "summary": summary,
        "records": records,
    }
    if suite == "long":
        results["settings"]["context"] = contexts
        results["settings"]["tasks"] = long_tasks
        results["long"] = long.long_summary(records, model.net)
    if out is not None:
        results["files"] = write_all(results, Path(out))
        if partial is not None:
            partial.unlink(missing_ok=True)
    return results


def retrieval_questions(model, questions, context, limit, seed, log):
    """(source, questions, {question id: item}) of the retrieval suite: the items of a
    `veridraft data retrieval` file, or `limit` (default 20) single-key items at `context`
    (default 4k) made now with the model's tokenizer."""
    from ..data import retrieval
    from .questions import Question

    if questions:
        items = retrieval.read_jsonl(questions)
        source = Path(questions)
        if context:
            raise VeridraftError("--suite retrieval:CONTEXT and --questions exclude each other")
    else:
        n = limit or 20
        items = retrieval.make_set(model.tokenizer, context=context or "4k", n=n, seed=seed)
        source = Path(f"retrieval-{items[0].context}-n{n}-seed{seed}.jsonl")
        log(f"retrieval: generated {len(items)} items of {items[0].context} tokens (seed {seed})")
    if not items:
        raise VeridraftError(f"the retrieval set {questions} is empty")
    qs = [
        Question(question_id=it.id, category=f"retrieval-{it.task}", turns=[it.prompt])
        for it in items
    ]
    return source, qs, {it.id: it for it in items}
