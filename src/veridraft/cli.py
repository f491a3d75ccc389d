"""`veridraft` command line: generate, models, bench, data, profile, tune, serve, loadtest. Logic lives in the library.

The commands import what they run (torch, the models) when they run, so that `veridraft --help`
and every `--help` answer without loading torch."""

from __future__ import annotations

import argparse
import sys

from .bench.cli import add_bench_parser
from .data.cli import add_data_parser
from .defaults import DEFAULT_MODEL
from .errors import VeridraftError
from .serve.cli import add_serve_parser
from .serve.loadtest import add_loadtest_parser
from .train.cli import add_train_parser
from .tune.cli import add_tune_parser


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import generate
    from .loader import load

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model, precision=args.precision, mmproj=args.mmproj)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    chat = False if args.raw else (True if model.tokenizer.has_chat_template else None)
    media = [{"type": "image", "image": p} for p in args.image or ()]
    media += [{"type": "video", "video": p, "fps": args.fps} for p in args.video or ()]
    if media:  # one user turn: the images and videos, then the prompt's text
        prompt = [{"role": "user", "content": [*media, {"type": "text", "text": prompt}]}]
        chat = False if args.raw else None  # the vision path renders the template

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
        kv=args.kv,
        verify=args.verify,
        lossless=args.lossless,
    )
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(gen.stats.details() if args.stats else gen.stats.summary(), file=sys.stderr)
    return 0


def _models(args: argparse.Namespace) -> int:
    from .loader import list_models
    from .models.catalog import pull

    if args.models_cmd == "pull":
        path = pull(args.name, force=args.force)
        print(f"{args.name}: {path}")
        return 0
    if args.models_cmd == "kernels":
        from .loader import build_kernels
        from .models.kernels import cpu_name, isa

        built = build_kernels()
        print(
            f"{cpu_name()} ({isa() or 'no AVX2'}): " + (", ".join(built) or "no kernels") + " ready"
        )
        return 0
    rows = list_models()
    print(
        f"{'name':<20} {'pulled':<7} {'on disk':>8} {'GGUF':>8} {'float32':>8} "
        f"{'memory fp32 / 16-bit':>21}  description"
    )
    for r in rows:
        print(
            f"{r['name']:<20} {'yes' if r['pulled'] else 'no':<7} "
            f"{r['size'] if r['pulled'] else '-':>8} {r['gguf']:>8} {r['float32_size']:>8} "
            f"{r['memory']:>21}  {r['description']}"
        )
    print(
        "GGUF: the model file (q4 and q4a8 run it); float32: the float modes' copy, made from "
        "it on first use"
    )
    from .models.config import architectures

    archs = architectures()
    print("architectures (HF folders): text " + ", ".join(a for a, mm in archs if not mm))
    print(
        "  multimodal (images and video in veridraft.generate's chat messages; an HF folder, "
        "or a GGUF with its mmproj): " + ", ".join(a for a, mm in archs if mm)
    )
    return 0


def _contexts(text: str) -> tuple[int, ...]:
    """ "100,1000,8k" -> (100, 1000, 8192): ascending, each >= 1."""
    from .bench.long import tokens

    out = []
    for piece in filter(None, (p.strip().lower() for p in text.split(","))):
        n = tokens(piece) or 0
        if n < 1:
            raise VeridraftError(
                f"--contexts {text!r}: {piece!r} is not a context length; give positions "
                "separated by commas, e.g. 100,1000,8k"
            )
        out.append(n)
    if not out:
        raise VeridraftError("--contexts is empty; e.g. --contexts 100,1000,8k")
    return tuple(sorted(set(out)))


def _profile(args: argparse.Namespace) -> int:
    import torch

    from .costmodel import load_cost, save_cost
    from .loader import load
    from .profile import accounting_line, measure, report, step_accounting

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model, precision=args.precision)
    if args.show:
        cost = load_cost(model)
        if cost is None:
            print(f"no cost profile for {model.name} ({model.precision}) on this machine")
            return 1
    else:
        contexts = _contexts(args.contexts)
        cmd = f"veridraft profile --model {args.model} --precision {model.precision}"
        cmd += f" --threads {torch.get_num_threads()} --repeats {args.repeats}"
        cmd += f" --contexts {','.join(map(str, contexts))}"
        cost = measure(model, repeats=args.repeats, contexts=contexts, command=cmd)
        if not args.no_save:
            path = save_cost(model, cost)
            print(f"saved {path}", file=sys.stderr)
    print(report(cost))
    if not args.show:
        print("\n" + accounting_line(step_accounting(model.net)))
    return 0


PROFILE_DESCRIPTION = """\
Measure the cost model of a model on this machine.

Times a target forward over T = 1, 2, 4, 8, 16, 32 new tokens at a short (100) and a long (1000)
context, or at those of --contexts (interleaved over T, after warm-up; medians), with the time
the bytes it reads and its multiply-adds bound it to on this machine, one step of each
drafter (ngram lookup, layerskip draft forward, the model drafter's forward with the first
layers), stores the result next to the model and prints it with the speedup speculative
decoding would give at acceptance rates 0.5-0.9 and the best draft length.
"""


def _add_profile_parser(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="measure forward and draft costs on this machine (the cost model)",
        description=PROFILE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help="catalog name, GGUF or folder")
    p.add_argument(
        "--precision",
        default="auto",
        help="auto (default: the fastest mode this CPU runs for the model) | fp32 | fp16w | "
        "bf16 | q4 | q4a8",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per point (default 7)")
    p.add_argument(
        "--contexts",
        default="100,1000",
        help="cached positions to time forwards at (default 100,1000; add e.g. 8k or 16k for "
        "long prompts: between and beyond them the cost model is linear in the context)",
    )
    p.add_argument("--no-save", action="store_true", help="print only, do not store the file")
    p.add_argument("--show", action="store_true", help="print the stored profile, measure nothing")
    p.set_defaults(func=_profile)


def _datastore(args: argparse.Namespace) -> int:
    from .datastore import build

    info = build(args.tokenizer, args.src, args.name, pattern=args.pattern)
    print(
        f"datastore {info['name']}: {info['files']} files, {info['text_bytes'] / 1e6:.1f} MB of "
        f"text -> {info['tokens']:,} tokens ({args.tokenizer} tokenizer); "
        f"{info['bytes'] / 1e6:.1f} MB on disk; built in {info['build_s']:.1f} s "
        f"(tokenizing {info['tokenize_s']:.1f} s, suffix array {info['sa_build_s']:.1f} s)"
    )
    return 0


def _add_datastore_parser(sub) -> None:
    d = sub.add_parser("datastore", help="build retrieval datastores (suffix:datastore=NAME)")
    dsub = d.add_subparsers(dest="datastore_cmd", required=True)
    b = dsub.add_parser(
        "build",
        help="tokenize a folder of files into a datastore under $VERIDRAFT_HOME/datastores",
    )
    b.add_argument("--tokenizer", required=True, help="catalog model or folder whose tokenizer")
    b.add_argument("--from", dest="src", required=True, help="folder of files to index")
    b.add_argument("--name", required=True, help="the datastore's name")
    b.add_argument("--pattern", default="*.py", help="file glob (default *.py)")
    d.set_defaults(func=_datastore)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="veridraft",
        description="Faster LLM generation without changing what the model would have said.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text, streaming it to the terminal")
    g.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    g.add_argument(
        "--model", "-m", default=DEFAULT_MODEL, help="catalog name, GGUF file or HF folder"
    )
    g.add_argument(
        "--mmproj",
        default=None,
        help="the vision tower GGUF of a Qwen2-VL / Qwen2.5-VL GGUF, as llama.cpp's converter "
        "writes it with --mmproj (default: the mmproj-*.gguf beside the model)",
    )
    g.add_argument(
        "--image", action="append", default=None, help="an image file for the prompt (repeatable)"
    )
    g.add_argument(
        "--video", action="append", default=None, help="a video file for the prompt (repeatable)"
    )
    g.add_argument("--fps", type=float, default=2.0, help="frames a second read from each --video")
    g.add_argument("--max-new-tokens", "-n", type=int, default=256)
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument(
        "--draft",
        default="auto",
        help="auto (default: the drafter expected to win here, or none) | none (plain "
        "decoding) | suffix | ngram | layerskip | model:NAME | ...",
    )
    g.add_argument(
        "--kv",
        default=None,
        help="lossy KV-cache compression: streaming | snapkv | pyramidkv | adakv | h2o | "
        "mm-shiftkv | hybridkv, with :budget=TOKENS or :budget=RATIO (default: full cache)",
    )
    g.add_argument(
        "--verify",
        default=None,
        help="acceptance rule: strict (default, lossless) | loose[:topk=5,lam=0.7,shift=2,"
        "anchor=content] (LOSSY: accepts filler tokens the model would not have chosen)",
    )
    g.add_argument(
        "--lossless", action="store_true", help="refuse any lossy method (e.g. --verify loose)"
    )
    g.add_argument(
        "--precision",
        default="auto",
        help="auto (default: the fastest mode this CPU runs for the model) | fp32 (the "
        "reference: the original weights) | fp16w | bf16 | q4 (the GGUF's own 4-bit blocks) | "
        "q4a8 (q4, 8-bit activations)",
    )
    g.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--stats", action="store_true", help="print speculative-decoding statistics")
    g.set_defaults(func=_generate)

    m = sub.add_parser("models", help="list or pull catalog models (alone: list)")
    msub = m.add_subparsers(dest="models_cmd")  # `veridraft models` alone lists, as `list` does
    msub.add_parser("list", help="list the catalog and what is on disk")
    mp = msub.add_parser("pull", help="download a catalog model's GGUF, config and tokenizer")
    mp.add_argument("name")
    mp.add_argument(
        "--force", action="store_true", help="download again, replacing what is on disk"
    )
    msub.add_parser(
        "kernels",
        help="compile veridraft's CPU kernels for this machine now (make setup does; else the "
        "first load does)",
    )
    m.set_defaults(func=_models)

    add_bench_parser(sub)
    add_data_parser(sub)
    _add_profile_parser(sub)
    _add_datastore_parser(sub)
    add_tune_parser(sub)
    add_train_parser(sub)
    add_serve_parser(sub)
    add_loadtest_parser(sub)
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
