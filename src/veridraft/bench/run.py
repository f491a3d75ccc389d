"""`run_bench`: one whole benchmark run, from a model and a method list to results.json,
report.md and speedup.png."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from .questions import Question, default_questions_path, load_questions, select
from .report import write_all

SUITES = ("spec-bench", "humaneval", "retrieval", "long")


def default_out_dir(model_name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(model_name)).name or "model")
    return Path("out") / f"bench-{safe}-{stamp}"


@dataclass
class BenchConfig:
    """What a benchmark run is given besides the model: the options of `veridraft bench`."""

    methods: str | Sequence[str] = DEFAULT_METHODS
    # spec-bench: a Spec-Bench-format JSONL (default: the dev questions shipped with veridraft);
    # retrieval: a `veridraft data retrieval` file; long: the novels (default: the copy shipped)
    questions: str | Path | None = None
    limit: int | None = None  # questions per task group (retrieval: items; long: chapters)
    groups: Sequence[str] | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    repeats: int = 1
    warmup: int = 1
    out: str | Path | None = None  # directory of results.json, report.md, ...; None: no files
    threads: int = 2
    seed: int = 0
    progress: bool = True
    bandwidth: bool = True  # estimate plain decoding's memory-bandwidth bound
    command: str | None = None  # the command line, recorded with the environment
    precision: str = "fp32"
    suite: str = "spec-bench"  # a name of SUITES, or retrieval:CONTEXT
    split: str = "even"  # humaneval task ids: even | odd | all
    context: str | Sequence[int] | None = None  # long: prompt lengths
    tasks: str | Sequence[str] | None = None  # long: task names

    def check(self) -> None:
        if self.repeats < 1:
            raise VeridraftError(f"--repeats must be at least 1, got {self.repeats}")
        if self.warmup < 0:
            raise VeridraftError(f"--warmup must be >= 0, got {self.warmup}")
        if self.max_new_tokens < 1:
            raise VeridraftError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.threads < 1:
            raise VeridraftError(f"--threads must be at least 1, got {self.threads}")


@dataclass
class Run:
    """One run as its steps fill it in: the methods and questions (with what the suite adds to
    them), then the facts results.json records besides the records. The retrieval and long
    suites lower `max_new_tokens` and drop `limit` (their own sets are the selection)."""

    suite: str
    suite_arg: str
    names: list[str]  # the methods
    max_new_tokens: int
    limit: int | None
    source: Path | None = None  # where the questions come from
    questions: list[Question] = field(default_factory=list)  # all of them
    chosen: list[Question] = field(default_factory=list)  # the ones that run
    items: dict | None = None  # retrieval: {question id: item}, for the accuracy score
    books: list | None = None  # long: the novels, made into questions once the model is loaded
    contexts: list[int] | None = None
    long_tasks: list[str] | None = None
    raw_ids: dict[str, list[int]] = field(default_factory=dict)  # long: pre-tokenised prompts
    load_peak_mb: float | None = None  # peak RSS with every method's models loaded
    load_start: list | None = None  # load average before the runs
    elapsed_s: float = 0.0


def run_bench(
    model, config: BenchConfig | None = None, log: Callable[[str], None] | None = None
) -> dict:
    """Benchmark `config.methods` on `model` (a catalog name, path, or a loaded model); write
    results.json, report.md and speedup.png into `config.out` (None: no files). Returns the
    results.

    suite "spec-bench" reads `questions` (a Spec-Bench-format file); "humaneval" uses the
    HumanEval problems of `split` (even | odd | all) and adds pass@1 per method; "long" builds
    the long-document tasks (bench/long.py) at the `context` lengths from `questions` (default:
    the novels shipped with veridraft) and adds prefill and KV figures per context length."""
    cfg = config or BenchConfig()
    log = log or (lambda s: print(s, file=sys.stderr))
    model, run = prepare(model, cfg, log)
    run.chosen = select(run.questions, list(cfg.groups) if cfg.groups else None, run.limit)
    meths = [make_method(n, model, threads=cfg.threads) for n in run.names]
    run.load_peak_mb = peak_rss_mb(True)  # models of every method loaded: the resident floor
    prot = Protocol(
        max_new_tokens=run.max_new_tokens,
        temperature=cfg.temperature,
        repeats=cfg.repeats,
        warmup=cfg.warmup,
        seed=cfg.seed,
        progress=cfg.progress,
        log=log,
    )
    run.load_start = announce(model, cfg, run, log)
    partial = record_as_they_come(cfg.out, prot, log)
    t_start = time.perf_counter()
    records = run_methods(model, meths, run, prot)
    run.elapsed_s = time.perf_counter() - t_start
    results = results_of(model, cfg, run, {m.name: m.info() for m in meths}, records, log)
    if cfg.out is not None:
        results["files"] = write_all(results, Path(cfg.out))
        if partial is not None:
            partial.unlink(missing_ok=True)
    return results


def prepare(model, cfg: BenchConfig, log) -> tuple[object, Run]:
    """Check the settings, then load the questions and the model (in the order each suite needs
    them). Returns the loaded model and the run."""
    cfg.check()
    names = method_names(cfg.methods, log)
    suite, _, suite_arg = cfg.suite.partition(":")
    if suite not in SUITES:
        raise VeridraftError(f"unknown --suite {suite!r}; choose one of {', '.join(SUITES)}")
    if isinstance(model, str | Path) and suite == "retrieval":  # its questions need the model
        model = load(str(model), precision=cfg.precision)
    run = Run(suite, suite_arg, names, cfg.max_new_tokens, cfg.limit)
    read_questions(model, cfg, run, log)
    torch.set_num_threads(cfg.threads)
    if isinstance(model, str | Path):
        model = load(str(model), precision=cfg.precision)
    if suite == "long":
        add_long_tasks(model, run, log)
    return model, run


def method_names(methods: str | Sequence[str], log: Callable[[str], None]) -> list[str]:
    """The --methods list, with veridraft's plain decoding added when a veridraft method needs
    it as the reference."""
    names = split_methods(methods)
    peer = tuple(f"{e}:" for e in PEER_ENGINES)
    if "ar" not in names and any(not n.startswith(peer) for n in names):
        log("adding method 'ar' (veridraft plain decoding): speedups and exact match need it")
        names.insert(0, "ar")
    return names


def read_questions(model, cfg: BenchConfig, run: Run, log) -> None:
    """The suite's questions (the long suite's books: they become questions once the model is
    loaded)."""
    suite, questions = run.suite, cfg.questions
    if suite == "retrieval":  # the lossy methods' task accuracy next to their speed
        run.source, run.questions, run.items = retrieval_questions(
            model, questions, run.suite_arg, cfg.limit, cfg.seed, log
        )
        run.limit = None  # the file or the generated set is the selection
        gen = min(it.gen_tokens for it in run.items.values())
        if run.max_new_tokens > gen:
            log(
                f"retrieval: max new tokens {run.max_new_tokens} -> {gen} (the items' answer "
                "budget)"
            )
            run.max_new_tokens = gen
    elif suite == "humaneval":
        if questions:
            raise VeridraftError("--questions and --suite humaneval exclude each other: drop one")
        run.source = humaneval.data_path()
        run.questions = humaneval.questions(cfg.split, run.source)
    elif suite == "long":
        run.source = Path(questions) if questions else long.default_data_path()
        run.books = long.load_books(run.source)
        run.contexts = long.parse_context(cfg.context or long.DEFAULT_CONTEXTS)
        run.long_tasks = long.parse_tasks(cfg.tasks or long.DEFAULT_TASKS)
    else:
        run.source = Path(questions) if questions else default_questions_path()
        run.questions = load_questions(run.source)


def add_long_tasks(model, run: Run, log) -> None:
    """The long suite's questions, made from its books with the model's tokenizer."""
    tk = model.tokenizer
    run.questions, run.raw_ids = long.build_tasks(
        run.books,
        tk.encode,
        lambda ids: tk.decode(ids, skip_special_tokens=True),
        lambda msgs: prompt_ids_for(model, msgs),
        contexts=run.contexts,
        tasks=run.long_tasks,
        max_new_tokens=run.max_new_tokens,
        context_limit=getattr(model, "context_length", None),
        chat=bool(tk.has_chat_template),
        limit=run.limit,
        log=log,
    )
    run.limit = None  # long: --limit is the number of chapters summarised


def announce(model, cfg: BenchConfig, run: Run, log) -> list | None:
    """Log what is about to run, and warn when other processes load the CPUs. Returns the load
    average at the start."""
    n_gen = cfg.repeats * sum(len(q.turns) for q in run.chosen)
    log(
        f"benchmark: {model.name}, {len(run.chosen)} questions ({n_gen} generations per method) "
        f"from {run.source}, methods {', '.join(run.names)}, {run.max_new_tokens} new tokens max, "
        f"{cfg.threads} threads"
    )
    load_start = loadavg()
    ncpu = os.cpu_count() or 1
    if load_start and load_start[0] > max(1.0, ncpu - cfg.threads + 0.5):
        log(
            f"warning: load average {load_start[0]:.1f} on {ncpu} CPUs: other processes are "
            "competing for the cores, so absolute timings will be slow and noisy (interleaving "
            "keeps the ratios comparable, but a quiet machine gives better figures)"
        )
    return load_start


def record_as_they_come(out: str | Path | None, prot: Protocol, log) -> Path | None:
    """Append every record to out/records.partial.jsonl as it is made, so that an interrupted
    run keeps what it measured. Returns that file (None without `out`)."""
    if out is None:
        return None
    Path(out).mkdir(parents=True, exist_ok=True)
    partial = Path(out) / "records.partial.jsonl"
    partial.write_text("")
    log(f"records are appended to {partial} as they come")

    def save(rec: dict, path=partial) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    prot.on_record = save
    return partial


def run_methods(model, meths, run: Run, prot: Protocol) -> list[dict]:
    """The interleaved runs (warm-up included) of every method; the methods are closed after."""
    tok = model.tokenizer

    def encode(msgs: list[dict]) -> list[int]:
        # retrieval prompts are completion-style raw text, for base and chat models alike;
        # long-suite continuations are raw book text, pre-tokenised
        if run.suite == "retrieval":
            return tok.encode(msgs[-1]["content"])
        if len(msgs) == 1 and msgs[0]["content"] in run.raw_ids:
            return run.raw_ids[msgs[0]["content"]]
        return prompt_ids_for(model, msgs)

    try:
        return run_protocol(
            run.chosen,
            meths,
            encode=encode,
            decode_text=lambda ids: tok.decode(ids, skip_special_tokens=True),
            protocol=prot,
        )
    finally:
        for m in meths:
            m.close()


def summarize_run(records: list[dict], info: dict, run: Run, log) -> dict:
    """The summary tables, with pass@1 (humaneval) and fidelity to plain decoding (the
    retrieval suite scores answers too)."""
    if run.suite == "humaneval":
        log("running the unit tests of every answer (pass@1)")
        problems = {str(q.question_id): q.extra["humaneval"] for q in run.chosen}
        passk.score_records(records, problems)
    summary = summarize(records, info)
    if run.suite == "humaneval":
        for table in summary["table"].values():
            for name, entry in table.items():
                if not entry.get("skipped"):
                    entry["pass_at_1"] = passk.pass_at_1(records, name)  # one group: all
    score = None
    if run.items is not None:
        from ..data.retrieval import score as retrieval_score

        def score(rec: dict) -> float | None:
            it = run.items.get(str(rec["question_id"]))
            return None if it is None else retrieval_score(rec.get("text") or "", it)

    add_fidelity(summary, records, "ar", score=score)
    return summary


def bandwidth_figure(model, records: list[dict], run: Run) -> dict:
    """Plain decoding's memory-bandwidth bound at the run's mean context."""
    ok = [r for r in records if r["method"] == "ar" and not r.get("error")]
    ctx = mean_of(r["prompt_tokens"] + r["new_tokens"] / 2 for r in ok) or run.max_new_tokens
    return bandwidth_bound(model.net, ctx)


def results_of(model, cfg: BenchConfig, run: Run, info: dict, records: list[dict], log) -> dict:
    """results.json's content: the settings as the run applied them, the environment, the
    methods, the summary and the records."""
    summary = summarize_run(records, info, run, log)
    env = {**environment(cfg.threads, cfg.command), "load_average_start": run.load_start}
    settings = {
        "suite": run.suite + (f":{run.suite_arg}" if run.suite_arg else ""),
        "split": cfg.split if run.suite == "humaneval" else None,
        "questions_file": recorded_path(str(run.source)),
        "questions": len(run.chosen),
        "question_ids": [q.question_id for q in run.chosen],
        "limit": run.limit,
        "groups": list(cfg.groups) if cfg.groups else None,
        "methods": run.names,
        "max_new_tokens": run.max_new_tokens,
        "temperature": cfg.temperature,
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "seed": cfg.seed,
        "threads": cfg.threads,
        "elapsed_s": run.elapsed_s,
    }
    results = {
        "format": "veridraft-bench/1",
        "model": {
            "name": model.name,
            "path": recorded_path(str(getattr(model, "path", ""))),
            "precision": getattr(model, "precision", None),
        },
        "settings": settings,
        "environment": env,
        "peak_rss_after_load_mb": run.load_peak_mb,
        "bandwidth_bound": bandwidth_figure(model, records, run) if cfg.bandwidth else None,
        "methods": info,
        "summary": summary,
        "records": records,
    }
    if run.suite == "long":
        settings["context"] = run.contexts
        settings["tasks"] = run.long_tasks
        results["long"] = long.long_summary(records, model.net)
    return results


def retrieval_questions(model, questions, context, limit, seed, log):
    """(source, questions, {question id: item}) of the retrieval suite: the items of a
    `veridraft data retrieval` file, or `limit` (default 20) single-key items at `context`
    (default 4k) made now with the model's tokenizer."""
    from ..data import retrieval

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
