"""ngram:branches=N: several continuations of the matched n-gram as a token tree; greedy
decoding with it equals plain decoding (tiny random model, and one catalog model)."""

from __future__ import annotations

import pytest
import torch
from drafting_helpers import dev_questions, prompt_ids, tiny_llama

from veridraft.decode import decode
from veridraft.drafters import NgramDrafter, make_drafter
from veridraft.drafters.base import DecodeContext
from veridraft.errors import VeridraftError
from veridraft.sampling import SamplingParams
from veridraft.tree import check_parents


def propose(ids, max_tokens=16, **kw):
    kw.setdefault("short_num_tokens", None)
    d = NgramDrafter(**kw)
    ctx = DecodeContext(
        ids=list(ids),
        prompt_len=len(ids),
        target=None,
        cache=None,
        sampling=SamplingParams(),
        generator=None,
    )
    d.prefill(ctx)
    return d.propose(ctx, max_tokens)


# (1, 2) is followed by 3 4 5, then 3 4 6, then 7 8 9; the suffix is (1, 2)
IDS = [1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 6, 0, 1, 2, 7, 8, 9, 0, 1, 2]


def test_branches_make_a_trie_most_recent_first():
    d = propose(IDS, num_tokens=3, max_ngram=2, branches=3)
    assert d.tokens == [7, 8, 9, 3, 4, 6, 5]
    assert d.parents == [-1, 0, 1, -1, 3, 4, 4]  # 3 4 6 and 3 4 5 share 3 4
    check_parents(d.parents, len(d.tokens))


def test_first_match_order_and_branch_limit():
    d = propose(IDS, num_tokens=3, max_ngram=2, branches=2, match="first")
    assert d.tokens == [3, 4, 5, 6]
    assert d.parents == [-1, 0, 1, 1]


def test_tree_stays_within_the_token_budget():
    d = propose(IDS, max_tokens=5, num_tokens=3, max_ngram=2, branches=3)
    assert d.tokens == [7, 8, 9, 3, 4]  # the first branch whole, then what fits
    assert d.parents == [-1, 0, 1, -1, 3]


def test_one_branch_is_todays_chain():
    for branches in (1, 4):
        d = propose([5, 6, 7, 1, 2, 9, 5, 6, 7], num_tokens=3, branches=branches)
        assert d.tokens == [1, 2, 9] and d.parents is None  # one distinct continuation
    chain = propose(IDS, num_tokens=3, max_ngram=2)
    assert chain.tokens == [7, 8, 9] and chain.parents is None


def test_branches_must_be_positive():
    with pytest.raises(VeridraftError, match="branches"):
        NgramDrafter(branches=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-ngram-tree"), layers=2, positions=256)


class CountTrees:
    """Wraps a drafter and counts its tree proposals, so a test knows trees were verified."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.trees = inner, inner.name, 0

    def prefill(self, ctx) -> None:
        self.inner.prefill(ctx)

    def propose(self, ctx, max_tokens):
        d = self.inner.propose(ctx, max_tokens)
        self.trees += d.parents is not None
        return d

    def update(self, rnd) -> None:
        self.inner.update(rnd)


def run(net, prompt, n, drafter=None):
    return decode(
        net,
        prompt,
        max_new_tokens=n,
        sampling=SamplingParams(),
        generator=torch.Generator(),
        drafter=drafter,
    )


def test_greedy_tree_equals_plain_on_a_tiny_model(tiny):
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 16, (60,), generator=g).tolist()
    plain, _ = run(tiny, prompt, 40)
    drafter = CountTrees(NgramDrafter(num_tokens=4, max_ngram=2, branches=4))
    out, stats = run(tiny, prompt, 40, drafter)
    assert out == plain
    assert drafter.trees > 0 and stats.accepted > 0


def test_greedy_tree_equals_plain_on_smollm2(real_model, plain_greedy):
    model = real_model("smollm2-135m")
    prompt = prompt_ids(model, dev_questions({"summarization": 1})[0])
    out, stats = decode(
        model.net,
        prompt,
        max_new_tokens=32,
        sampling=SamplingParams(),
        generator=torch.Generator(),
        drafter=(drafter := CountTrees(make_drafter("ngram:branches=3", model))),
    )
    assert out == plain_greedy(model, prompt, 32)
    assert drafter.trees > 0
