"""The Spec-Bench protocol: methods interleaved per question, one record per generated turn.

Protocol (Spec-Bench; docs/performance/README.md says how to read the figures):
- batch size 1; warm-up runs first (every method, on the first question);
- for each question, every method runs back to back (the conversation of a multi-turn question
  included: turn 2 sees the same method's turn-1 answer); the order rotates by one method per
  question and per repeat, so no method always goes first;
- every method gets the same prompt ids, built by veridraft's tokenizer outside the timed region;
  the timed region is the generation call only (prefill + decode);
- tokens are the generated ids of every method (never re-tokenized text).
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from ..drafters import forget_earlier_generations
from ..errors import VeridraftError
from .base import Method
from .environment import loadavg
from .memory import peak_rss_mb, peak_rss_reset
from .questions import Question


def rotated(methods: Sequence, k: int) -> list:
    """methods rotated left by k (k taken modulo the length)."""
    if not methods:
        return []
    k %= len(methods)
    return list(methods[k:]) + list(methods[:k])


def _run_seed(seed: int, repeat: int, qi: int, turn: int) -> int:
    return (seed * 1_000_003 + repeat * 10_007 + qi * 101 + turn) % 2**31


@dataclass
class Protocol:
    max_new_tokens: int = 256
    temperature: float = 0.0
    repeats: int = 1
    warmup: int = 1
    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr))
    on_record: Callable[[dict], None] | None = None  # e.g. append to a partial-results file


def run_protocol(
    questions: list[Question],
    methods: list[Method],
    encode: Callable[[list[dict]], list[int]],
    decode_text: Callable[[list[int]], str],
    protocol: Protocol,
) -> list[dict]:
    """Run every (repeat, question, method, turn); return one record per generated turn.

    encode(messages) builds prompt ids (chat template, or raw text for base models);
    decode_text(ids) gives the answer text that enters the next turn's messages.
    """
    p = protocol
    for m in methods:
        if m.skip_reason is None:
            try:
                m.prepare()
            except ImportError as e:
                m.skip_reason = f"{type(e).__name__}: {e}"
        if m.skip_reason:
            p.log(f"skipping method {m.name}: {m.skip_reason}")
    active = [m for m in methods if not m.skip_reason]
    if not active:
        raise VeridraftError("no method can run (all were skipped)")
    if not questions:
        raise VeridraftError("no questions selected")

    first_ids = encode([{"role": "user", "content": questions[0].turns[0]}])
    if p.warmup:
        p.log(
            f"warm-up: {p.warmup} run(s) of each method on question {questions[0].question_id} "
            f"({len(first_ids)} prompt tokens)"
        )
    for w in range(p.warmup):
        for m in rotated(active, w):
            try:
                m.run(
                    first_ids,
                    max_new_tokens=p.max_new_tokens,
                    temperature=p.temperature,
                    seed=_run_seed(p.seed, -1, 0, w),
                )
            except (VeridraftError, ValueError, RuntimeError) as e:
                # the timed runs record the method's failures; the other methods go on
                p.log(f"warm-up of {m.name} failed: {type(e).__name__}: {e}")

    # Everything loaded so far (models, transformers' module graph) is long-lived: freeze it so
    # the collection before each run only walks what the runs themselves allocate.
    gc.collect()
    gc.freeze()
    total = p.repeats * sum(len(q.turns) for q in questions) * len(active)
    bar = None
    if p.progress:
        bar = tqdm(total=total, file=sys.stderr, unit="gen", dynamic_ncols=True, leave=True)
    reset_ok = peak_rss_reset()
    records: list[dict] = []
    try:
        for r in range(p.repeats):
            # measured runs never draft from the warm-up's or an earlier repeat's answers
            forget_earlier_generations()
            for qi, q in enumerate(questions):
                for pos, m in enumerate(rotated(active, qi + r)):
                    messages: list[dict] = []
                    for turn, content in enumerate(q.turns):
                        if bar is not None:
                            bar.set_description(
                                f"rep {r + 1}/{p.repeats} q {qi + 1}/{len(questions)} "
                                f"(id {q.question_id}) {m.name}",
                                refresh=True,
                            )
                        messages.append({"role": "user", "content": content})
                        rec = _one_run(
                            m, q, messages, r, qi, turn, pos, encode, decode_text, p, reset_ok
                        )
                        records.append(rec)
                        if p.on_record is not None:
                            p.on_record(rec)
                        if bar is not None:
                            bar.update(1)
                        if rec.get("error"):
                            msg = f"{m.name} failed on question {q.question_id}: {rec['error']}"
                            (bar.write if bar is not None else p.log)(msg)
                            if bar is not None:
                                bar.update(len(q.turns) - turn - 1)
                            break
                        messages.append({"role": "assistant", "content": rec["text"]})
    finally:
        if bar is not None:
            bar.close()
        gc.unfreeze()
    return records


def _one_run(m, q, messages, r, qi, turn, pos, encode, decode_text, p, reset_ok) -> dict:
    rec = {
        "method": m.name,
        "repeat": r,
        "question_id": q.question_id,
        "category": q.category,
        "group": q.group,
        "turn": turn,
        "order": pos,
    }
    try:
        ids = encode(list(messages))
        rec["prompt_tokens"] = len(ids)
        gc.collect()
        if reset_ok:
            peak_rss_reset()
        out = m.run(
            ids,
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            seed=_run_seed(p.seed, r, qi, turn),
        )
    except (VeridraftError, ValueError, RuntimeError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    # a peer in a worker process reports the worker's own peak
    rec["peak_rss_mb"] = out.peak_rss_mb if out.peak_rss_mb is not None else peak_rss_mb(reset_ok)
    rec["time"] = round(time.time(), 3)  # when it ended (unix time)
    load = loadavg()
    rec["load_1min"] = load[0] if load else None  # CPU contention around this run
    n = len(out.ids)
    rec.update(
        ids=list(out.ids),
        text=decode_text(list(out.ids)),
        new_tokens=n,
        wall_s=out.wall_s,
        prefill_s=out.prefill_s,
        decode_s=None if out.prefill_s is None else out.wall_s - out.prefill_s,
        tokens_per_s=n / out.wall_s if out.wall_s > 0 else None,
        finish_reason=out.finish_reason,
        steps=out.steps,
        stats=out.stats,
    )
    return rec
