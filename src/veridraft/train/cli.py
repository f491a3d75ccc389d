"""`veridraft train head`: features over a corpus, then an EAGLE-3 head next to the model."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from ..defaults import DEFAULT_MODEL
from ..errors import VeridraftError


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a drafter for a model on this machine (head: an EAGLE-3 draft head)",
        description="Train a drafter for a model on this machine; the drafter finds it by default.",
    )
    sub = p.add_subparsers(dest="train_cmd", required=True, metavar="{head}")
    h = sub.add_parser(
        "head",
        help="train an EAGLE-3 draft head (draft with --draft eagle)",
        description="Compute the target's features over a corpus (once, resumable), train an "
        "EAGLE-3 head on them with training-time test and write it to <model folder>/heads/"
        "eagle-NAME/, where the `eagle` drafter finds it.",
    )
    h.add_argument("--model", "-m", default=DEFAULT_MODEL, help="catalog name, GGUF or HF folder")
    h.add_argument("--precision", default="auto", help="the target's mode (default: auto)")
    h.add_argument(
        "--corpus",
        default=None,
        help="stdlib (this Python's standard library), spec-bench-dev (the shipped dev "
        "questions the benchmark does not measure on, answered by the model), novels (passages "
        "of the shipped novels to continue, summarise or describe, answered by the model), "
        "chat-mix (the two interleaved), a folder of .py files or a JSONL of prompts "
        "(default: stdlib for a code model, spec-bench-dev otherwise)",
    )
    h.add_argument("--max-tokens", type=int, default=200_000, help="feature tokens (200000)")
    h.add_argument("--epochs", type=int, default=4, help="passes over the features (4)")
    h.add_argument("--minutes", type=float, default=None, help="stop training after MIN minutes")
    h.add_argument("--steps", type=int, default=3, help="training-time-test steps (3)")
    h.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary size (8192)")
    h.add_argument("--mlp", type=int, default=None, help="MLP width (default: the model's)")
    h.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (1e-3)")
    h.add_argument("--batch", type=int, default=4, help="samples per step (4)")
    h.add_argument(
        "--answer-tokens", type=int, default=192, help="tokens per generated answer (192)"
    )
    h.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="bfloat16 matmuls in training (auto: on where the CPU has AVX512-BF16 or AMX)",
    )
    h.add_argument(
        "--freeze-lm-head",
        action="store_true",
        help="keep the target's own output rows as the head's (fewer weights to learn)",
    )
    h.add_argument(
        "--fusion",
        choices=("fc", "gated"),
        default="fc",
        help="how the head joins the target's features and the token embedding: fc (EAGLE-3, "
        "loadable by vLLM/SGLang) or gated (Dovetail's gating fusion; veridraft only)",
    )
    h.add_argument(
        "--layers",
        type=int,
        default=1,
        help="decoder layers of the head (1: EAGLE-3; more: a deeper draft, veridraft only)",
    )
    h.add_argument(
        "--window",
        type=int,
        default=None,
        help="LongSpec's constant-size draft: the head attends to the first --sink and the last "
        "W positions only (drafting then keeps that many rows); default: every position",
    )
    h.add_argument("--sink", type=int, default=4, help="positions at the start every row sees (4)")
    h.add_argument(
        "--anchor-offset",
        type=int,
        default=0,
        help="shift each sample's positions after the sink by a random 0..N, so the head sees "
        "the position numbers of a long context on short samples (LongSpec; default 0)",
    )
    h.add_argument(
        "--name",
        default=None,
        help="head name (default: the corpus name, plus -gated / -Nl for a variant, -wW for a "
        "window)",
    )
    h.add_argument("--out", default=None, help="head folder (default: <model>/heads/eagle-NAME)")
    h.add_argument("--no-progress", action="store_true", help="no progress bar")
    h.set_defaults(func=run_train_head)
    return p


def _default_corpus(model) -> str:
    return "stdlib" if "coder" in model.name.lower() else "spec-bench-dev"


def run_train_head(args: argparse.Namespace) -> int:
    import torch

    from ..drafters.eagle import HEADS_DIR, PREFIX, default_aux_ids, save_head
    from ..loader import load
    from ..models import kernels
    from . import features
    from .trainer import TrainConfig, train

    flags = ("max_tokens", "epochs", "steps", "draft_vocab", "batch", "answer_tokens", "layers")
    for flag in flags:
        if getattr(args, flag) < 1:
            raise VeridraftError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.minutes is not None and args.minutes <= 0:
        raise VeridraftError("--minutes must be > 0")
    if args.window is not None and args.window < 1:
        raise VeridraftError(f"--window {args.window}: give a window >= 1 (or leave it out)")
    if args.sink < 0 or args.anchor_offset < 0:
        raise VeridraftError("--sink and --anchor-offset must be >= 0")
    model = load(args.model, args.precision)
    corpus = features.find_corpus(args.corpus or _default_corpus(model))
    aux_ids = default_aux_ids(model.net.config.n_layers)
    layers = tuple(i - 1 for i in aux_ids)
    variant = (
        ("-gated" if args.fusion == "gated" else "")
        + (f"-{args.layers}l" if args.layers != 1 else "")
        + (f"-w{args.window}" if args.window is not None else "")
    )
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", args.name or corpus.name + variant)
    out = Path(args.out) if args.out else model.path / HEADS_DIR / (PREFIX + name)
    print(
        f"model {model.name} ({model.precision}), corpus {corpus.name} ({corpus.kind}, "
        f"{len(corpus.items)} items), layers {list(aux_ids)}, head -> {out}"
    )
    folder, feat_s = features.compute(
        model,
        corpus,
        layers,
        max_tokens=args.max_tokens,
        answer_tokens=args.answer_tokens,
        progress=not args.no_progress,
    )
    samples = features.load_samples(folder)
    n_tok = sum(int(s.ids.numel()) for s in samples)
    print(f"features: {n_tok} tokens in {len(samples)} samples, {feat_s:.1f} s this run ({folder})")
    cfg = TrainConfig(
        steps=args.steps,
        epochs=args.epochs,
        minutes=args.minutes,
        lr=args.lr,
        batch=args.batch,
        draft_vocab=args.draft_vocab,
        intermediate_size=args.mlp,
        bf16=args.bf16 == "on"
        or (args.bf16 == "auto" and bool({"avx512_bf16", "amx_bf16"} & kernels.cpu_flags())),
        freeze_lm_head=args.freeze_lm_head,
        fusion=args.fusion,
        layers=args.layers,
        window=args.window,
        sink=args.sink,
        anchor_offset=args.anchor_offset,
    )
    meta = {
        "target": model.name,
        "trained_precision": model.precision,
        "corpus": corpus.name,
        "feature_tokens": n_tok,
        "ttt_steps": args.steps,
        "date": time.strftime("%Y-%m-%d"),
    }
    torch.manual_seed(0)
    # beside the head's folder, so that a stopped run (Ctrl-C, a lost machine) continues
    ckpt = out.parent / f".{out.name}.training.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    head, rep = train(
        model.net,
        samples,
        cfg,
        aux_ids=aux_ids,
        meta=meta,
        checkpoint=ckpt,
        progress=not args.no_progress,
    )
    loss, alpha, tau = rep.held[-1]
    head.config.meta.update(
        {"held_back_acceptance": round(alpha, 4), "held_back_tokens_per_round": round(tau, 3)}
    )
    try:
        save_head(head, out)
    except OSError as e:
        raise VeridraftError(f"cannot write the head to {out}: {e}; pass --out DIR") from e
    ckpt.unlink(missing_ok=True)
    print(
        f"training: {rep.steps} steps over {rep.tokens} tokens in {rep.seconds:.1f} s; "
        f"held-back acceptance {alpha:.3f}, tokens/round {tau:.2f}"
    )
    print(f"head written to {out}; draft with --draft eagle (or eagle:head={out})")
    return 0
