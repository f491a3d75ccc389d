"""`veridraft data retrieval`: write a retrieval set (RULER-style needles in novel text) as
JSONL."""

from __future__ import annotations

import argparse
import sys

from ..defaults import DEFAULT_MODEL
from ..errors import VeridraftError


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="generate evaluation data (retrieval set)")
    sub = p.add_subparsers(dest="data_cmd", required=True)
    r = sub.add_parser(
        "retrieval",
        help="needles (special magic numbers) hidden in long text, with exact answers",
        description=(
            "Write a RULER-style retrieval set: each item is a completion-style prompt of about "
            "CONTEXT tokens (minus --gen-tokens) of the given tokenizer, with needles at chosen "
            "depths, the keys asked and the exact values expected."
        ),
    )
    r.add_argument("--tokenizer", default=DEFAULT_MODEL, help="catalog model or folder")
    r.add_argument("--context", default="4k", help="2k | 4k | 8k | 16k | 32k | a token count")
    r.add_argument("--n", type=int, default=20, help="items per task (default 20)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--tasks",
        default="single",
        help="comma-separated: single, multikey, multivalue, multiquery (default single)",
    )
    r.add_argument(
        "--depths",
        default=None,
        help="comma-separated depths in [0, 1] for the asked needle "
        "(default: --n depths spread evenly)",
    )
    r.add_argument("--needles", type=int, default=4, help="needles of the multi-* tasks")
    r.add_argument("--gen-tokens", type=int, default=32, help="tokens left for the answer")
    r.add_argument("--haystack", default=None, help="JSONL of books (default: the Austen set)")
    r.add_argument("-o", "--out", required=True, help="output JSONL file ('-' for stdout)")
    r.set_defaults(func=run_retrieval_cli)
    return p


def _floats(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise VeridraftError(
            f"--depths must be numbers separated by commas, got {text!r}"
        ) from None


def run_retrieval_cli(args: argparse.Namespace) -> int:
    import json

    from . import retrieval

    items = retrieval.make_set(
        args.tokenizer,
        context=args.context,
        n=args.n,
        seed=args.seed,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        depths=_floats(args.depths),
        needles=args.needles,
        gen_tokens=args.gen_tokens,
        haystack=args.haystack,
    )
    if args.out == "-":
        for it in items:
            sys.stdout.write(json.dumps(it.to_dict()) + "\n")
    else:
        retrieval.write_jsonl(items, args.out)
        print(
            f"wrote {len(items)} items ({items[0].context} tokens of context, "
            f"prompts {min(i.prompt_tokens for i in items)}-{max(i.prompt_tokens for i in items)} "
            f"tokens) to {args.out}",
            file=sys.stderr,
        )
    return 0
