"""`veridraft tune` and `python -m veridraft.tune`: arguments and the command."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..defaults import DEFAULT_MODEL
from ..errors import VeridraftError
from . import __doc__ as tune_doc


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune",
        help="tune a drafter for a model on this machine (layerskip: Bayesian search of skips)",
        description="Tune a drafter for a model on this machine and write a profile that the "
        "drafter then loads by default.",
    )
    sub = p.add_subparsers(dest="tune_cmd", required=True, metavar="{layerskip}")
    t = sub.add_parser(
        "layerskip",
        help="search the attention / MLP sub-layers that self-speculation skips",
        description=(tune_doc or "").split("\n\n")[0],
    )
    _add_layerskip_args(t)
    t.set_defaults(func=_tune_cli)
    return p


def _add_layerskip_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--model", "-m", default=DEFAULT_MODEL, help="catalog name, GGUF or HF folder")
    t.add_argument(
        "--calib",
        default=None,
        metavar="FILE",
        help="Spec-Bench-format JSONL of calibration questions "
        "(default: the Spec-Bench questions shipped in the package)",
    )
    t.add_argument("--prompts", type=int, default=8, metavar="N", help="calibration prompts (8)")
    t.add_argument(
        "--max-new-tokens", type=int, default=32, metavar="T", help="new tokens per prompt (32)"
    )
    t.add_argument("--iters", type=int, default=100, metavar="N", help="trials in total (100)")
    t.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MIN",
        help="stop in about MIN minutes, the final re-measurement included",
    )
    t.add_argument(
        "--out",
        default=None,
        metavar="PROFILE.json",
        help="profile to write (default $VERIDRAFT_HOME/profiles/layerskip.<model>.<precision>"
        ".json, where `layerskip` finds it); trials go to PROFILE.trials.jsonl beside it",
    )
    t.add_argument(
        "--search-exit", action="store_true", help="also search initial gamma and max draft steps"
    )
    t.add_argument(
        "--precision",
        default="fp32",
        help="precision to load and tune in: fp32 (default) | fp16w | bf16 | q4 | q4a8",
    )
    t.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument(
        "--baseline-prompts",
        type=int,
        default=None,
        metavar="B",
        help="prompts on which each trial re-measures plain decoding, back to back with the "
        "draft run (default: all, a fully interleaved baseline; fewer is cheaper but scales "
        "stored ar times by the drift seen on B prompts, which is noisy on a busy machine)",
    )
    t.add_argument("--final-top", type=int, default=3, metavar="N", help="re-measured at the end")
    t.add_argument("--final-rounds", type=int, default=2, metavar="R")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def tune_command(args: argparse.Namespace) -> str:
    """The command that reproduces this run: `veridraft tune layerskip` and every option whose
    value differs from its default, in the parser's order. Built from the parsed arguments, not
    sys.argv, which is another program's when `main()` is called with a list."""
    blank = argparse.ArgumentParser(add_help=False)
    _add_layerskip_args(blank)
    words = ["veridraft", "tune", "layerskip"]
    for dest, default in vars(blank.parse_args([])).items():
        value = getattr(args, dest, default)
        if value == default:
            continue
        flag = "--" + dest.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def _tune_cli(args: argparse.Namespace) -> int:
    if args.baseline_prompts is not None and not 1 <= args.baseline_prompts <= args.prompts:
        raise VeridraftError(f"--baseline-prompts must be between 1 and --prompts ({args.prompts})")
    # Imported on use: tuning needs torch and the models, `veridraft tune --help` does not.
    from .search import tune_layerskip

    command = tune_command(args)
    res = tune_layerskip(
        args.model,
        calib=args.calib,
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        iters=args.iters,
        time_budget=args.time_budget,
        out=args.out,
        search_exit=args.search_exit,
        precision=args.precision,
        threads=args.threads,
        seed=args.seed,
        baseline_prompts=args.baseline_prompts,
        final_top=args.final_top,
        final_rounds=args.final_rounds,
        progress=not args.no_progress,
        command=command,
    )
    print(res.path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m veridraft.tune")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_tune_parser(sub)
    args = parser.parse_args(["tune", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except VeridraftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
