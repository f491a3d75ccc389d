"""The draft -> verify -> accept -> roll back loop (docs/design.md). Plain decoding is the same loop
with no drafter: every round verifies an empty draft and emits one token.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache
from .draft import DecodeContext, Draft, Drafter, Round
from .errors import VeridraftError
from .sampling import SamplingParams, probs, sample
from .stats import Stats
from .tree import tree_attn
from .verify import STRICT, Rule

_EMPTY = Draft(tokens=[])


def first_token(logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator) -> int:
    if sampling.greedy:
        return int(logits.argmax())
    return sample(probs(logits, sampling), gen)


@dataclass
class Prefill:
    """A prompt already run through the target: its cache and the logits of its last position.

    Reusable: `decode` rolls the cache back to the prompt before each use (O(1)), so repeated
    generations from one prompt (tuning, benchmarks) pay the prefill once.
    """

    ids: list[int]
    cache: KVCache
    logits: torch.Tensor  # [V] logits after the last prompt id


# Prompt positions per prefill forward. Activations (the MLP's hidden rows above all) grow with
# the rows of a forward, so a chunk bounds the prefill's peak memory whatever the prompt length:
# at 1024 rows qwen2.5-coder-0.5b's widest activation (the fused gate/up rows) is ~40 MB, and
# matmuls over 1024 rows already run at their many-row speed. A multiple of the attention tile
# (models/attention.py PREFILL_TILE) and of the bf16 row block (models/precision.py ROW_BLOCK) keeps
# chunked prefill bitwise equal to a one-block prefill in the batch-invariant modes.
PREFILL_CHUNK = 1024
# a tail this short joins the chunk before it: short forwards take the verification kernels
TAIL_MIN = 65


def run_prompt(
    target, ids: Sequence[int], cache: KVCache, chunk: int | None = PREFILL_CHUNK, capture=None
) -> torch.Tensor:
    """Run ids through target into cache (from its current length) in chunks of `chunk`
    positions (None or 0: one forward); return the logits of the last position [V].
    `capture` (models.base.Capture) is handed to every chunk's forward."""
    ids = list(ids)
    if chunk is not None and chunk < 0:
        raise VeridraftError(f"prefill chunk must be a positive number of tokens, got {chunk}")
    bounds = [0]
    if chunk:
        while len(ids) - bounds[-1] > chunk + TAIL_MIN - 1:
            bounds.append(bounds[-1] + chunk)
    bounds.append(len(ids))
    logits = None
    parts: dict[int, list[torch.Tensor]] = {}  # captured hidden states, one tensor per chunk
    for a, b in zip(bounds, bounds[1:]):
        tokens = torch.tensor(ids[a:b], dtype=torch.long)
        if capture is None:
            logits = target(tokens, cache, num_logits=1)
        else:
            logits = target(tokens, cache, capture=capture, num_logits=1)
            for key in set(capture.hidden_layers):
                parts.setdefault(key, []).append(capture.hidden[key])
    for key, rows in parts.items():  # every prompt row, not just the last chunk's
        capture.hidden[key] = rows[0] if len(rows) == 1 else torch.cat(rows)
    return logits[-1]


@torch.inference_mode()
def prefill(
    target, prompt_ids: Sequence[int], max_len: int, chunk: int | None = PREFILL_CHUNK
) -> Prefill:
    """Run prompt_ids through target into a new cache of max_len positions."""
    ids = list(prompt_ids)
    cache = target.new_cache(max_len)
    logits = run_prompt(target, ids, cache, chunk)
    return Prefill(ids=ids, cache=cache, logits=logits.clone())


def _update_fn(drafter) -> Callable[[Round], None]:
    """drafter.update for a Round; a drafter written for the older `update(n_accepted,
    next_token)` signature gets those two values."""
    fn = drafter.update
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is p.empty]
    if len(required) >= 2:
        return lambda r: fn(r.n_accepted, r.next_token)
    return fn


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
    prefilled: Prefill | None = None,
    rule: Rule | None = None,
    segments: Sequence[tuple[str, int, int]] = (),
    prefill_chunk: int | None = PREFILL_CHUNK,
) -> tuple[list[int], Stats]:
    """Generate up to max_new_tokens after prompt_ids; return (new ids, stats).

    rule: the acceptance rule (verify.Rule; None: strict, lossless); a lossy one is named in
    stats (`lossy`, `verify`, `relaxed`).
    should_stop(new_ids) returns the number of new ids to keep when a stop condition is met
    (e.g. a stop string completed), or None to go on. on_tokens receives committed ids.
    prefilled: the prompt's cache and last logits from `prefill` (its ids must be prompt_ids).
    segments: (kind, start, end) parts of the prompt for the drafter (DecodeContext.segments).
    prefill_chunk: prompt positions per prefill forward (None: the whole prompt at once).
    """
    stats = Stats(prompt_tokens=len(prompt_ids), method=getattr(drafter, "name", "ar"))
    rule = rule or STRICT
    stats.verify, stats.lossy = rule.name, bool(rule.lossy)
    t_start = time.perf_counter()
    need = len(prompt_ids) + max_new_tokens + max_draft + 1
    pcap = getattr(drafter, "prompt_capture", None)
    pcap = pcap() if pcap is not None and prefilled is None else None
    if prefilled is None:
        cache = target.new_cache(need)
        last = run_prompt(target, prompt_ids, cache, prefill_chunk, capture=pcap)
    else:
        if prefilled.ids != list(prompt_ids):
            raise VeridraftError("the prefilled prompt differs from prompt_ids; prefill this one")
        if prefilled.cache.max_len < need:
            raise VeridraftError(
                f"the prefilled cache holds {prefilled.cache.max_len} positions, this generation "
                f"needs {need}; prefill with a larger max_len"
            )
        cache = prefilled.cache
        cache.truncate(len(prompt_ids))
        last = prefilled.logits
    ids = list(prompt_ids) + [first_token(last, sampling, generator)]
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
        segments=check_segments(segments, len(prompt_ids)),
        prompt_capture=pcap,
    )
    keep = _finish_point(new, eos_ids, should_stop, max_new_tokens)
    update = None
    wants_scores = False
    verify_capture = None
    if drafter is not None:
        update = _update_fn(drafter)
        wants_scores = bool(getattr(drafter, "wants_scores", False))
        verify_capture = getattr(drafter, "verify_capture", None)
    if drafter is not None and keep is None:
        t = time.perf_counter()
        cache.mark()
        drafter.prefill(ctx)
        _check_cache(cache, len(ids) - 1, stats.method, "prefill")
        stats.draft_s += time.perf_counter() - t
    if on_tokens:
        on_tokens(new[: keep if keep is not None else len(new)])

    while keep is None:
        budget = max_new_tokens - len(new)
        t0 = time.perf_counter()
        draft = _EMPTY
        start = cache.length
        if drafter is not None and budget > 1:
            cache.mark()
            draft = drafter.propose(ctx, min(budget - 1, max_draft))
            _check_cache(cache, start, stats.method, "propose")
            if len(draft.tokens) > min(budget - 1, max_draft):
                raise ValueError(f"drafter {stats.method} proposed more tokens than allowed")
        t1 = time.perf_counter()
        tokens = torch.tensor([ids[-1], *draft.tokens], dtype=torch.long)
        cap = verify_capture(ctx) if verify_capture is not None else None
        kw = {}
        if draft.parents is not None:  # a token tree: each node sees its ancestors only
            kw["tree"] = tree_attn(draft.parents)
            cap = cap if cap is not None and _hidden_only(cap) else None
        if cap is not None:
            kw["capture"] = cap
        logits = target(tokens, cache, **kw)
        path, nxt, relaxed = rule.accept(logits, draft, sampling, generator)
        stats.relaxed += relaxed
        n_acc = len(path)
        # the accepted nodes' rows become consecutive positions (a no-op for a chain)
        cache.keep(start + 1, [start + 1 + i for i in path])
        cache.truncate(start + 1 + n_acc)
        t2 = time.perf_counter()
        committed = [*(draft.tokens[i] for i in path), nxt]
        ids.extend(committed)
        new.extend(committed)
        stats.record_round(len(draft.tokens), n_acc)
        if update is not None:
            update(
                Round(
                    n_accepted=n_acc,
                    next_token=nxt,
                    drafted=len(draft.tokens),
                    ids=ids,
                    draft_s=t1 - t0,
                    verify_s=t2 - t1,
                    scores=logits if wants_scores else None,
                    capture=cap,
                    path=path,
                )
            )
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


def _hidden_only(cap) -> bool:
    """A capture of hidden states alone (what a tree forward may take: the attention captures
    describe chain rows)."""
    return not (getattr(cap, "attn_rows", 0) or getattr(cap, "press_rows", 0))


def check_segments(segments, n: int) -> list[tuple[str, int, int]]:
    """Segments as (kind, start, end) tuples inside the prompt, in order, not overlapping."""
    out: list[tuple[str, int, int]] = []
    end = 0
    for seg in segments:
        try:
            kind, a, b = seg
            a, b = int(a), int(b)
        except (TypeError, ValueError):
            raise VeridraftError(
                f"segment {seg!r} is not (kind, start, end); pass a list of such tuples"
            ) from None
        if not isinstance(kind, str) or not kind or not end <= a <= b <= n:
            raise VeridraftError(
                f"segment {seg!r} must name a kind and lie in the prompt's {n} ids, in order, "
                "without overlapping the previous one"
            )
        out.append((kind, a, b))
        end = b
    return out


def _check_cache(cache: KVCache, length: int, method: str, step: str) -> None:
    """A drafter may write past the committed length but must leave the target cache as it
    found it; anything else would corrupt verification silently."""
    if cache.length != length or cache.low_water < length:
        what = (
            f"its length {length} -> {cache.length}"
            if cache.length != length
            else f"position {cache.low_water}, below the committed length {length}"
        )
        raise VeridraftError(
            f"drafter {method} changed the target's KV cache in {step} ({what}); a drafter must "
            "restore cache.length and write only past it"
        )


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
