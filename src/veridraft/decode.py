"""The draft -> verify -> accept -> roll back loop (DESIGN.md). Plain decoding is the same loop
with no drafter: every round verifies an empty draft and emits one token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from .drafters.base import DecodeContext, Draft, Drafter
from .sampling import SamplingParams, probs, sample
from .stats import Stats
from .verify import verify

_EMPTY = Draft(tokens=[])


def first_token(logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator) -> int:
    if sampling.greedy:
        return int(logits.argmax())
    return sample(probs(logits, sampling), gen)


@torch.inference_mode()
def decode(
    target,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    generator: torch.Generator,
    drafter: Drafter | None = None,
    eos_ids: set[int] | frozenset[int] = frozenset(),
    should_stop: Callable[[list[int]], int | None] | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
    tokenizer=None,
    max_draft: int = 16,
) -> tuple[list[int], Stats]:
    """Generate up to max_new_tokens after prompt_ids; return (new ids, stats).

    should_stop(new_ids) returns the number of new ids to keep when a stop condition is met
    (e.g. a stop string completed), or None to go on. on_tokens receives committed ids.
    """
    stats = Stats(prompt_tokens=len(prompt_ids), method=getattr(drafter, "name", "ar"))
    t_start = time.perf_counter()
    cache = target.new_cache(len(prompt_ids) + max_new_tokens + max_draft + 1)
    logits = target(torch.tensor(list(prompt_ids), dtype=torch.long), cache, num_logits=1)
    ids = list(prompt_ids) + [first_token(logits[-1], sampling, generator)]
    stats.prefill_s = time.perf_counter() - t_start
    new = ids[len(prompt_ids) :]
    ctx = DecodeContext(
        ids=ids,
        prompt_len=len(prompt_ids),
        target=target,
        cache=cache,
        sampling=sampling,
        generator=generator,
        tokenizer=tokenizer,
        max_new_tokens=max_new_tokens,
    )
    keep = _finish_point(new, eos_ids, should_stop, max_new_tokens)
    if drafter is not None and keep is None:
        t = time.perf_counter()
        drafter.prefill(ctx)
        stats.draft_s += time.perf_counter() - t
    if on_tokens:
        on_tokens(new[: keep if keep is not None else len(new)])

    while keep is None:
        budget = max_new_tokens - len(new)
        t0 = time.perf_counter()
        draft = _EMPTY
        if drafter is not None and budget > 1:
            draft = drafter.propose(ctx, min(budget - 1, max_draft))
            if len(draft.tokens) > min(budget - 1, max_draft):
                raise ValueError(f"drafter {stats.method} proposed more tokens than allowed")
        t1 = time.perf_counter()
        start = cache.length
        logits = target(torch.tensor([ids[-1], *draft.tokens], dtype=torch.long), cache)
        n_acc, nxt = verify(logits, draft, sampling, generator)
        cache.truncate(start + 1 + n_acc)
        t2 = time.perf_counter()
        committed = [*draft.tokens[:n_acc], nxt]
        ids.extend(committed)
        new.extend(committed)
        stats.record_round(len(draft.tokens), n_acc)
        if drafter is not None:
            drafter.update(n_acc, nxt)
        keep = _finish_point(new, eos_ids, should_stop, max_new_tokens)
        if on_tokens:
            shown = len(new) - len(committed)
            on_tokens(new[shown : keep if keep is not None else len(new)])
        t3 = time.perf_counter()
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        stats.other_s += t3 - t2
    del new[keep:]
    stats.new_tokens = len(new)
    stats.total_s = time.perf_counter() - t_start
    return new, stats


def _finish_point(new, eos_ids, should_stop, max_new_tokens) -> int | None:
    """How many new ids to keep if generation must stop now, else None."""
    for i, tok in enumerate(new):
        if tok in eos_ids:
            return i + 1
    if should_stop is not None:
        cut = should_stop(new)
        if cut is not None:
            return cut
    if len(new) >= max_new_tokens:
        return max_new_tokens
    return None
