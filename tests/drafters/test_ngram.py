"""Prompt lookup: longest-suffix matching, the incremental index, limits and parameters."""

from __future__ import annotations

import random

import pytest

from veridraft.drafters import NgramDrafter
from veridraft.drafters.base import DecodeContext
from veridraft.errors import VeridraftError
from veridraft.sampling import SamplingParams


def ctx_for(ids: list[int]) -> DecodeContext:
    return DecodeContext(
        ids=ids,
        prompt_len=len(ids),
        target=None,
        cache=None,
        sampling=SamplingParams(),
        generator=None,
    )


def propose(ids, max_tokens=16, **kw) -> list[int]:
    kw.setdefault("short_num_tokens", None)  # one length for every match unless a test says so
    d = NgramDrafter(**kw)
    ctx = ctx_for(list(ids))
    d.prefill(ctx)
    return d.propose(ctx, max_tokens).tokens


def test_longest_suffix_match_wins_over_more_recent_shorter_one():
    # suffix (5, 6, 7): the 3-gram occurs once (followed by 1, 2); the 1-gram 7 occurs later
    ids = [5, 6, 7, 1, 2, 9, 7, 3, 5, 6, 7]
    assert propose(ids, num_tokens=2) == [1, 2]


def test_falls_back_to_shorter_ngrams():
    ids = [1, 2, 3, 4, 9, 9, 3]  # only the 1-gram (3,) matches
    assert propose(ids, num_tokens=3) == [4, 9, 9]
    assert propose(ids, num_tokens=3, min_ngram=2) == []


def test_last_and_first_occurrence():
    ids = [1, 2, 10, 11, 1, 2, 20, 21, 0, 1, 2]
    assert propose(ids, num_tokens=2) == [20, 21]  # most recent earlier occurrence
    assert propose(ids, num_tokens=2, match="first") == [10, 11]  # HF's choice


def test_match_near_the_end_continues_periodically():
    ids = [7, 8, 9, 7, 8, 9, 7]
    assert propose(ids, num_tokens=7) == [8, 9, 7, 8, 9, 7, 8]


def test_no_match_and_tiny_inputs():
    assert propose([1, 2, 3, 4]) == []
    assert propose([5]) == []
    assert propose([5, 5]) == [5] * 10


def test_limits():
    ids = list(range(20)) + [3]
    assert propose(ids, num_tokens=10) == list(range(4, 14))
    assert propose(ids, num_tokens=10, max_tokens=3) == [4, 5, 6]
    assert propose(ids, num_tokens=10, max_tokens=0) == []


def brute_force(ids, num_tokens, max_ngram, min_ngram, match, short=None):
    """Reference: scan every earlier position for the longest suffix match."""
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        suffix = ids[-n:]
        hits = [j for j in range(n, len(ids)) if ids[j - n : j] == suffix]
        if hits:
            if n < max_ngram and short is not None:
                num_tokens = min(num_tokens, short)
            j = hits[-1] if match == "last" else hits[0]
            seq = list(ids)
            out = []
            for i in range(num_tokens):
                if j + i < len(seq):
                    out.append(seq[j + i])
                else:
                    out.append(out[j + i - len(ids)])
            return out
    return []


@pytest.mark.parametrize("match", ["last", "first"])
def test_incremental_index_equals_brute_force_while_ids_grow(match):
    rng = random.Random(0)
    ids = [rng.randrange(6) for _ in range(30)]
    d = NgramDrafter(num_tokens=5, max_ngram=3, min_ngram=1, match=match)  # short: 2
    ctx = ctx_for(ids)
    d.prefill(ctx)
    for _ in range(200):
        got = d.propose(ctx, 5).tokens
        assert got == brute_force(ids, 5, 3, 1, match, short=2)
        n_acc = rng.randrange(len(got) + 1)
        committed = got[:n_acc] + [rng.randrange(6)]
        ids.extend(committed)  # ctx.ids grows in place, as in decode
        d.update(n_acc, committed[-1])


def test_shorter_matches_propose_fewer_tokens():
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 2, 3]  # 2-gram (2, 3) only
    assert propose(ids, num_tokens=6, short_num_tokens=2) == [4, 5]
    assert propose(ids, num_tokens=6, short_num_tokens=0) == []
    assert propose(ids, num_tokens=6, short_num_tokens=None) == [4, 5, 6, 7, 8, 9]
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]  # full 3-gram match
    assert propose(ids, num_tokens=6, short_num_tokens=2) == [4, 5, 6, 7, 8, 9]
    assert NgramDrafter(num_tokens=1).short_num_tokens == 1  # never longer than num_tokens


def test_prefill_resets_between_generations():
    d = NgramDrafter(num_tokens=2, max_ngram=2)
    a = ctx_for([1, 2, 3, 1, 2])
    d.prefill(a)
    assert d.propose(a, 4).tokens == [3, 1]
    b = ctx_for([1, 2, 7, 1, 2])
    d.prefill(b)
    assert d.propose(b, 4).tokens == [7, 1]


def test_long_prompt_is_indexed_once():
    ids = [random.Random(1).randrange(1000) for _ in range(20_000)]
    d = NgramDrafter()
    ctx = ctx_for(ids)
    d.prefill(ctx)
    assert d._done == len(ids)
    ids.append(5)
    d.propose(ctx, 10)
    assert d._done == len(ids)  # one new position indexed, not the whole list


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"num_tokens": 0}, "num_tokens must be an integer >= 1"),
        ({"max_ngram": "x"}, "max_ngram must be an integer"),
        ({"min_ngram": 4, "max_ngram": 3}, "min_ngram (4) must be <= max_ngram (3)"),
        ({"match": "middle"}, "match must be one of first, last"),
    ],
)
def test_bad_parameters(kw, msg):
    with pytest.raises(VeridraftError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        NgramDrafter(**kw)
