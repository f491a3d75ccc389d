"""Prompt lookup (n-gram) drafting: copy what followed the last time the current suffix appeared.

Over prompt + generated ids, find the longest suffix n-gram (n from `max_ngram` down to
`min_ngram`) that occurred earlier, and propose the up to `num_tokens` ids that followed it.
Proposals are deterministic, so they are verified as point masses (q = None): lossless under
greedy decoding and under sampling.

Cost: an incremental hash index (n-gram -> position after it) is extended by the new ids of each
round, so a round costs O(new ids x n-gram sizes), independent of the prompt length; the prompt
is indexed once in `prefill`.

Draft length depends on the evidence: after a match of the full `max_ngram` length the drafter
proposes up to `num_tokens` ids; after a shorter match (weaker evidence, lower acceptance) at most
`short_num_tokens`. Set `short_num_tokens=num_tokens` for HF's behaviour (one length for all).

Defaults: `max_ngram=3`, `min_ngram=1`, `num_tokens=10`, `short_num_tokens=2`. HF's prompt lookup
uses `max_matching_ngram_size=2` and users typically pass `prompt_lookup_num_tokens=10`; vLLM's
`prompt_lookup_max` is commonly 3-5. A 3-gram match is specific enough on long prompts to copy 10
ids; 1- and 2-gram matches are right less often, and on a CPU a verification forward over more
than 3 positions costs much more than over 1 (fp32 GEMM: ~1.8x at 4 positions on the dev
machine), so they propose 2. Replaying greedy smollm2-135m outputs on 30 Spec-Bench questions
(exact: ngram drafts depend on the ids only), this rule beat a single length of 10 under a steep
verification-cost curve (1.30x vs 0.83x estimated) and matched it under a flat one (1.57x vs
1.48x). `match="last"` (default) takes the most recent earlier occurrence of the suffix, which
follows the text being copied right now; `match="first"` is HF's choice (the leftmost one).

`branches=N` (default 1, the chain above) proposes a token tree: up to N distinct continuations
of the longest matched n-gram (its occurrences in `match` order), merged where they share a
prefix, within the same total of draft tokens. The first branch is the chain `branches=1` would
propose, so a tree only adds alternatives for the positions where earlier occurrences disagree.
"""

from __future__ import annotations

from ..draft import DecodeContext, Draft, DraftEnv, Round
from ..errors import VeridraftError
from ..spec import Param
from .params import as_choice, as_int

# Acceptance assumed when the cost model (veridraft profile) picks the default draft length.
NGRAM_PRIOR_ALPHA = 0.6


class NgramDrafter:
    """Point-mass proposals from the longest earlier match of the current suffix."""

    name = "ngram"
    cost_key = "ngram"  # the cost model's draft-step figure (veridraft profile) for this code
    takes_arg = False
    description = "prompt lookup: copy what followed an earlier occurrence of the current suffix"
    params = {
        "num_tokens": Param(int, 10, "ids drafted after a full-length match (cost model's best)"),
        "short_num_tokens": Param(int, 2, "at most this many after a shorter match"),
        "max_ngram": Param(int, 3, "longest suffix n-gram matched"),
        "min_ngram": Param(int, 1, "shortest suffix n-gram matched"),
        "match": Param(str, "last", "which earlier occurrence is copied", ("first", "last")),
        "branches": Param(int, 1, "> 1: a token tree of that many continuations"),
    }
    aliases = {
        "k": "num_tokens",
        "prompt_lookup_num_tokens": "num_tokens",
        "max_matching_ngram_size": "max_ngram",
        "prompt_lookup_max": "max_ngram",
        "prompt_lookup_min": "min_ngram",
        "short": "short_num_tokens",
    }

    def __init__(
        self,
        num_tokens: int = 10,
        max_ngram: int = 3,
        min_ngram: int = 1,
        match: str = "last",
        short_num_tokens: int | None = 2,
        branches: int = 1,
    ) -> None:
        self.branches = as_int("ngram", "branches", branches, lo=1)
        self.num_tokens = as_int("ngram", "num_tokens", num_tokens, lo=1)
        self.short_num_tokens = (
            self.num_tokens
            if short_num_tokens is None
            else min(self.num_tokens, as_int("ngram", "short_num_tokens", short_num_tokens, lo=0))
        )
        self.max_ngram = as_int("ngram", "max_ngram", max_ngram, lo=1)
        self.min_ngram = as_int("ngram", "min_ngram", min_ngram, lo=1)
        self.match = as_choice("ngram", "match", match, ("last", "first"))
        if self.min_ngram > self.max_ngram:
            raise VeridraftError(
                f"ngram: min_ngram ({self.min_ngram}) must be <= max_ngram ({self.max_ngram})"
            )
        self.expected_slowdown: str | None = None  # why plain decoding may be faster here
        self._reset()

    @classmethod
    def from_spec(
        cls, model, arg: str | None, params: dict, env: DraftEnv | None = None
    ) -> NgramDrafter:
        cost = env.cost(model) if env is not None and env.cost is not None else None
        slower = None
        if cost is not None:
            k = cost.best_k(NGRAM_PRIOR_ALPHA, cost.draft_cost("ngram") or 0.0)
            if "num_tokens" not in params:  # no draft length given: the measured best
                params = {**params, "num_tokens": max(1, k)}
            if k == 0:
                slower = (
                    f"ngram: the cost model of this machine ({cost.precision}) predicts no gain "
                    f"at a typical acceptance of {NGRAM_PRIOR_ALPHA}; plain decoding (no draft) "
                    "may be faster"
                )
        d = cls(**params)
        d.expected_slowdown = slower
        return d

    def __repr__(self) -> str:
        return (
            f"NgramDrafter(num_tokens={self.num_tokens}, short_num_tokens={self.short_num_tokens}, "
            f"max_ngram={self.max_ngram}, "
            f"min_ngram={self.min_ngram}, match={self.match!r}, branches={self.branches})"
        )

    # -- index --

    def _reset(self) -> None:
        sizes = range(self.min_ngram, self.max_ngram + 1)
        # n -> {n-gram: index of the id that followed it}
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in sizes}
        # with branches > 1: n -> {n-gram: every index that followed it, oldest first}
        self._all: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in sizes}
        self._ids: list[int] | None = None
        self._done = 0  # continuation positions < _done are indexed

    def _extend(self, ids: list[int]) -> None:
        """Index every n-gram that has a following id (those ending before ids[-1])."""
        if ids is not self._ids or len(ids) < self._done:
            self._reset()
            self._ids = ids
        last = self.match == "last"
        end = len(ids)  # continuation positions j < end; j = end would have nothing after it
        for n, table in self._index.items():
            for j in range(max(self._done, n), end):
                key = tuple(ids[j - n : j])
                if last or key not in table:
                    table[key] = j
                if self.branches > 1:
                    self._all[n].setdefault(key, []).append(j)
        self._done = max(self._done, end)

    # -- drafter protocol --

    def prefill(self, ctx: DecodeContext) -> None:
        self._reset()
        self._ids = ctx.ids
        self._extend(ctx.ids)

    def propose(self, ctx: DecodeContext, max_tokens: int) -> Draft:
        ids = ctx.ids
        if max_tokens <= 0 or len(ids) < 2:
            return Draft(tokens=[])
        self._extend(ids)  # the suffix itself has no continuation, so it never matches itself
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            j = self._index[n].get(tuple(ids[-n:]))
            if j is not None:
                full = self.num_tokens if n == self.max_ngram else self.short_num_tokens
                limit = min(full, max_tokens)
                tokens = _continuation(ids, j, limit)
                if self.branches == 1:
                    return Draft(tokens=tokens)
                return self._tree(ids, n, j, tokens, limit, max_tokens)
        return Draft(tokens=[])

    def _tree(
        self, ids: list[int], n: int, j: int, first: list[int], limit: int, max_tokens: int
    ) -> Draft:
        """The chain `first` plus up to branches - 1 distinct continuations from the other
        occurrences of the matched n-gram, as a trie within max_tokens nodes."""
        found = self._all[n].get(tuple(ids[-n:]), [])
        order = reversed(found) if self.match == "last" else iter(found)
        conts = [first]
        for other in order:
            if len(conts) >= self.branches:
                break
            cont = _continuation(ids, other, limit)
            if other != j and cont not in conts:
                conts.append(cont)
        tokens: list[int] = []
        parents: list[int] = []
        node: dict[tuple[int, int], int] = {}
        for cont in conts:
            cur = -1
            for tok in cont:
                if (cur, tok) in node:
                    cur = node[(cur, tok)]
                    continue
                if len(tokens) >= max_tokens:
                    break
                node[(cur, tok)] = len(tokens)
                tokens.append(tok)
                parents.append(cur)
                cur = len(tokens) - 1
        if parents == list(range(-1, len(tokens) - 1)):
            return Draft(tokens=tokens)  # one branch: a plain chain
        return Draft(tokens=tokens, parents=parents)

    def update(self, rnd: Round | int, next_token: int | None = None) -> None:
        pass  # the index catches up with ctx.ids on the next propose


def _continuation(ids: list[int], j: int, limit: int) -> list[int]:
    """Up to `limit` ids from ids[j]; a match close to the end runs out of ids and keeps copying
    from the proposal itself (a periodic text continues with its period)."""
    tokens = ids[j : j + limit]
    end = len(ids)
    while len(tokens) < limit:
        tokens.append(tokens[j + len(tokens) - end])
    return tokens
