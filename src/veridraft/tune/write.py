"""The tuned profile: what the search found, the figures it measured, and the machine it ran
on, written where the layerskip drafter finds it."""

from __future__ import annotations

import datetime
import os
import statistics
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ..bench.environment import cpu_name
from ..profiles import Profile, save_profile
from .space import Config


def _version() -> str:
    try:
        return version("veridraft")
    except PackageNotFoundError:
        return "?"


def build_profile(
    *,
    model_name: str,
    ident: dict,
    precision: str,
    win: dict,
    hand: dict,
    scores: dict[tuple, list[float]],
    search: dict,
    n_prompts: int,
    max_new_tokens: int,
    final_rounds: int,
    command: str,
) -> Profile:
    """The profile of the winning configuration `win` (a `remeasure` row); `hand` is the
    hand-picked default's row, `scores` the search's speedups per configuration key and
    `search` the description of the search (optimiser, trials, questions...)."""
    wc: Config = win["config"]
    return Profile(
        model=model_name,
        n_layers=ident["n_layers"],
        precision=precision,
        skip=wc.skip,
        gamma=round(float(win["gamma_end"]), 4),
        num_tokens=wc.num_tokens,
        source_sha256=ident["source_sha256"],
        architecture=ident["architecture"],
        figures={
            "speedup": round(win["speedup"], 4),
            "tau": round(win["tau"], 4),
            "alpha": None if win["alpha"] is None else round(win["alpha"], 4),
            "tokens_per_s": round(win["tokens_per_s"], 3),
            "ar_tokens_per_s": round(win["ar_tokens_per_s"], 3),
            "hand_picked_speedup": round(hand["speedup"], 4),
            "hand_picked_tau": round(hand["tau"], 4),
            "search_speedup": round(statistics.mean(scores[win["key"]]), 4),
            "measured_on": (
                f"{n_prompts} prompts x {max_new_tokens} new tokens, greedy, decode phase "
                f"(prefill excluded), {final_rounds} interleaved rounds vs ar"
            ),
        },
        search=search,
        machine={
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "veridraft": _version(),
        },
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=command or "",
    )


def write_profile(
    prof: Profile, out: Path, win: dict, hand: dict, log: Callable[[str], None]
) -> Path:
    """Save the profile to `out` and say what was found (and when nothing beats plain decoding)."""
    path = save_profile(prof, out)
    prof.path = path
    log(f"profile: {path}\n  {prof.describe()}")
    log(
        f"  hand-picked default: {hand['speedup']:.3f}x (tau {hand['tau']:.2f}); "
        f"tuned: {win['speedup']:.3f}x (tau {win['tau']:.2f})"
    )
    if win["speedup"] < 1.0:
        log(
            "  WARNING: no configuration tried beats plain decoding on this machine; the draft "
            "costs nearly a full forward here (see docs/tuning.md)"
        )
    return path
