"""The draft -> verify -> accept -> roll back loop (docs/design.md). Plain decoding is the same loop
with no drafter: every round verifies an empty draft and emits one token.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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


def prompt_bounds(n: int, chunk: int | None) -> list[int]:
    """Where run_prompt splits n prompt positions into forwards: [0, .., n]."""
    if chunk is not None and chunk < 0:
        raise VeridraftError(f"prefill chunk must be a positive number of tokens, got {chunk}")
    bounds = [0]
    if chunk:
        while n - bounds[-1] > chunk + TAIL_MIN - 1:
            bounds.append(bounds[-1] + chunk)
    bounds.append(n)
    return bounds


def run_prompt(
    target, ids: Sequence[int], cache: KVCache, chunk: int | None = PREFILL_CHUNK, capture=None
) -> torch.Tensor:
    """Run ids through target into cache (from its current length) in chunks of `chunk`
    positions (None or 0: one forward); return the logits of the last position [V].
    `capture` (models.base.Capture) is handed to every chunk's forward."""
    ids = list(ids)
    bounds = prompt_bounds(len(ids), chunk)
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


@dataclass
class Seq:
    """One sequence between rounds: what the decode loop carries from round to round. `decode`
    runs one; batch.py runs several, each with its own cache, drafter and draft length."""

    ids: list[int]  # prompt and committed ids; ids[-1] not yet run through the target
    new: list[int]  # the committed ids after the prompt
    cache: KVCache
    ctx: DecodeContext
    stats: Stats
    sampling: SamplingParams
    generator: torch.Generator
    rule: Rule
    max_new_tokens: int
    max_draft: int
    drafter: Drafter | None = None
    eos_ids: set[int] | frozenset[int] = frozenset()
    should_stop: Callable[[list[int]], int | None] | None = None
    on_tokens: Callable[[list[int]], None] | None = None
    keep: int | None = None  # new ids to keep once finished; None while generating
    t_start: float = 0.0
    # this round: the draft, the cache length before it, its capture, propose's start and end
    draft: Draft = field(default_factory=lambda: _EMPTY)
    start: int = 0
    cap: object = None
    t0: float = 0.0
    t1: float = 0.0
    path: list[int] = field(default_factory=list)  # the accepted draft nodes of the last round
    update: Callable[[Round], None] | None = None
    wants_scores: bool = False
    verify_capture: Callable | None = None


def start_seq(
    target, prompt_ids: Sequence[int], cache: KVCache, last: torch.Tensor, stats: Stats, **kw
) -> Seq:
    """A Seq whose prompt is in `cache` (`last`: the logits after it): the first token drawn,
    the drafter prefilled, the first id handed to on_tokens. kw: Seq's settings and
    `tokenizer`, `segments`, `prompt_capture` for the DecodeContext."""
    tokenizer, segments = kw.pop("tokenizer", None), kw.pop("segments", ())
    pcap = kw.pop("prompt_capture", None)
    s = Seq(ids=list(prompt_ids), new=[], cache=cache, ctx=None, stats=stats, **kw)
    s.ids.append(first_token(last, s.sampling, s.generator))
    s.stats.prefill_s = time.perf_counter() - s.t_start
    s.new = s.ids[len(prompt_ids) :]
    s.ctx = DecodeContext(
        ids=s.ids,
        prompt_len=len(prompt_ids),
        target=target,
        cache=cache,
        sampling=s.sampling,
        generator=s.generator,
        tokenizer=tokenizer,
        max_new_tokens=s.max_new_tokens,
        segments=check_segments(segments, len(prompt_ids)),
        prompt_capture=pcap,
    )
    s.keep = _finish_point(s.new, s.eos_ids, s.should_stop, s.max_new_tokens)
    if s.drafter is not None:
        s.update = _update_fn(s.drafter)
        s.wants_scores = bool(getattr(s.drafter, "wants_scores", False))
        s.verify_capture = getattr(s.drafter, "verify_capture", None)
    if s.drafter is not None and s.keep is None:
        t = time.perf_counter()
        cache.mark()
        s.drafter.prefill(s.ctx)
        _check_cache(cache, len(s.ids) - 1, s.stats.method, "prefill")
        s.stats.draft_s += time.perf_counter() - t
    if s.on_tokens:
        s.on_tokens(s.new[: s.keep if s.keep is not None else len(s.new)])
    return s


def propose(s: Seq, max_draft: int | None = None) -> tuple[torch.Tensor, dict]:
    """Draft this round (at most max_draft tokens; None: the Seq's own cap); return the rows to
    verify, [last id] + draft, and the forward's keywords (tree, capture)."""
    budget = s.max_new_tokens - len(s.new)
    limit = min(budget - 1, s.max_draft if max_draft is None else max_draft)
    s.t0 = time.perf_counter()
    s.draft, s.start = _EMPTY, s.cache.length
    # a cap of 0 from a scheduler skips the drafter; the Seq's own cap keeps the call
    if s.drafter is not None and budget > 1 and (limit > 0 or max_draft is None):
        s.cache.mark()
        s.draft = s.drafter.propose(s.ctx, limit)
        _check_cache(s.cache, s.start, s.stats.method, "propose")
        if len(s.draft.tokens) > limit:
            raise ValueError(f"drafter {s.stats.method} proposed more tokens than allowed")
    s.t1 = time.perf_counter()
    tokens = torch.tensor([s.ids[-1], *s.draft.tokens], dtype=torch.long)
    s.cap = s.verify_capture(s.ctx) if s.verify_capture is not None else None
    kw = {}
    if s.draft.parents is not None:  # a token tree: each node sees its ancestors only
        kw["tree"] = tree_attn(s.draft.parents)
        s.cap = s.cap if s.cap is not None and _hidden_only(s.cap) else None
    if s.cap is not None:
        kw["capture"] = s.cap
    return tokens, kw


def commit(s: Seq, logits: torch.Tensor) -> list[int]:
    """Accept from the verification rows' logits (the forward has advanced the cache by their
    count), roll the cache back to the accepted path, tell the drafter; return the ids committed."""
    path, nxt, relaxed = s.rule.accept(logits, s.draft, s.sampling, s.generator)
    s.stats.relaxed += relaxed
    n_acc, s.path = len(path), path
    # the accepted nodes' rows become consecutive positions (a no-op for a chain)
    s.cache.keep(s.start + 1, [s.start + 1 + i for i in path])
    s.cache.truncate(s.start + 1 + n_acc)
    t2 = time.perf_counter()
    committed = [*(s.draft.tokens[i] for i in path), nxt]
    s.ids.extend(committed)
    s.new.extend(committed)
    s.stats.record_round(len(s.draft.tokens), n_acc)
    if s.update is not None:
        s.update(
            Round(
                n_accepted=n_acc,
                next_token=nxt,
                drafted=len(s.draft.tokens),
                ids=s.ids,
                draft_s=s.t1 - s.t0,
                verify_s=t2 - s.t1,
                scores=logits if s.wants_scores else None,
                capture=s.cap,
                path=path,
            )
        )
    s.keep = _finish_point(s.new, s.eos_ids, s.should_stop, s.max_new_tokens)
    if s.on_tokens:
        shown = len(s.new) - len(committed)
        s.on_tokens(s.new[shown : s.keep if s.keep is not None else len(s.new)])
    s.stats.draft_s += s.t1 - s.t0
    s.stats.verify_s += t2 - s.t1
    s.stats.other_s += time.perf_counter() - t2
    return committed


def finish(s: Seq) -> tuple[list[int], Stats]:
    """The new ids (cut at the finish point) and the stats of a finished Seq."""
    del s.new[s.keep :]
    s.stats.new_tokens = len(s.new)
    s.stats.total_s = time.perf_counter() - s.t_start
    return s.new, s.stats


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
    s = start_seq(
        target, prompt_ids, cache, last, stats, sampling=sampling, generator=generator,
        rule=rule, max_new_tokens=max_new_tokens, max_draft=max_draft, drafter=drafter,
        eos_ids=eos_ids, should_stop=should_stop, on_tokens=on_tokens, t_start=t_start,
        tokenizer=tokenizer, segments=segments, prompt_capture=pcap,
    )  # fmt: skip
    while s.keep is None:
        tokens, kw = propose(s)
        commit(s, target(tokens, s.cache, **kw))
    return finish(s)


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
