"""`veridraft` command line: generate, models, bench, profile. Logic lives in the library."""

from __future__ import annotations

import argparse
import sys

from .errors import VeridraftError


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import generate
    from .loader import load

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model, precision=args.precision)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    chat = False if args.raw else (True if model.tokenizer.has_chat_template else None)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    gen = generate(
        model,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        stream=show,
        draft=args.draft,
        chat=chat,
    )
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(gen.stats.details() if args.stats else gen.stats.summary(), file=sys.stderr)
    return 0


def _models(args: argparse.Namespace) -> int:
    from .loader import list_models
    from .models.catalog import pull

    if args.models_cmd == "pull":
        path = pull(args.name)
        print(f"{args.name}: {path}")
        return 0
    rows = list_models()
    print(f"{'name':<16} {'pulled':<7} {'size':>9}  description")
    for r in rows:
        print(
            f"{r['name']:<16} {'yes' if r['pulled'] else 'no':<7} {r.get('size', ''):>9}  "
            f"{r['description']}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="veridraft",
        description="Faster LLM generation without changing what the model would have said.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text, streaming it to the terminal")
    g.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    g.add_argument(
        "--model", "-m", default="smollm2-135m", help="catalog name, GGUF file or HF folder"
    )
    g.add_argument("--max-new-tokens", "-n", type=int, default=256)
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument(
        "--draft", default=None, help="ngram | layerskip | model:NAME | ... (default: none)"
    )
    g.add_argument(
        "--precision",
        default="fp32",
        help="fp32 (default) | fp16w | bf16 | q4 (the GGUF's own 4-bit blocks)",
    )
    g.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--stats", action="store_true", help="print speculative-decoding statistics")
    g.set_defaults(func=_generate)

    m = sub.add_parser("models", help="list or pull catalog models")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="list the catalog")
    mp = msub.add_parser("pull", help="download and convert a catalog model")
    mp.add_argument("name")
    m.set_defaults(func=_models)

    from .bench.harness import add_bench_parser
    from .profile import add_profile_parser
    from .tune import add_tune_parser

    add_bench_parser(sub)
    add_profile_parser(sub)
    add_tune_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VeridraftError as e:
        print(f"veridraft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("veridraft: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
