"""The loose acceptance rule (lossy): strict on anchors, relaxed on fillers (top-k and the
probability ratio), the position-shift tolerance, and exactly strict with zero tolerance."""

from __future__ import annotations

import math

import pytest
import torch
from drafting_helpers import tiny_llama

from veridraft.decode import decode
from veridraft.draft import Draft
from veridraft.errors import VeridraftError
from veridraft.loose import Loose, is_filler_text, token_classes
from veridraft.sampling import SamplingParams
from veridraft.verify import STRICT, verify_draft

GREEDY = SamplingParams()
V = 8
# token ids of a toy vocabulary: 0-3 fillers (" the", " a", ",", " of"), 4-6 content words,
# 7 a number
TEXTS = [" the", " a", ",", " of", " cat", " sat", " Mat", " 42"]


class ToyTok:
    def __len__(self) -> int:
        return len(TEXTS)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(TEXTS[i] for i in ids)


def toy_rule(**kw) -> Loose:
    filler, digit = token_classes(ToyTok(), V)
    return Loose(filler=filler, digit=digit, **kw)


def logits_for(*rows: dict[int, float]) -> torch.Tensor:
    """One row per position: the given tokens get these logits, the others -10."""
    out = torch.full((len(rows), V), -10.0)
    for i, row in enumerate(rows):
        for tok, val in row.items():
            out[i, tok] = val
    return out


def test_token_classes_from_text():
    assert [is_filler_text(t) for t in TEXTS] == [True] * 4 + [False] * 4
    assert is_filler_text("\n\n") and is_filler_text(" The") and not is_filler_text(" 7")
    filler, digit = token_classes(ToyTok(), V + 2)  # padding rows beyond the tokenizer
    assert filler.tolist() == [True] * 4 + [False] * 6
    assert digit.tolist() == [False] * 7 + [True, False, False]


def test_loose_accepts_a_filler_mismatch_that_strict_rejects():
    # target wants " the" (0) then " cat" (4); the draft says " a" (1), " cat" (4)
    logits = logits_for({0: 2.0, 1: 1.5}, {4: 3.0}, {5: 1.0})
    draft = Draft(tokens=[1, 4])
    assert verify_draft(logits, draft, GREEDY, None) == ([], 0)
    path, nxt, relaxed = toy_rule().accept(logits, draft, GREEDY, None)
    assert (path, nxt, relaxed) == ([0, 1], 5, 1)


def test_anchors_stay_strict():
    # target " cat" (4), draft " Mat" (6): content words, however close
    logits = logits_for({4: 2.0, 6: 1.99}, {5: 1.0})
    assert toy_rule().accept(logits, Draft(tokens=[6]), GREEDY, None) == ([], 4, 0)
    # a filler draft where the target wants content: strict too
    logits = logits_for({4: 2.0, 0: 1.99}, {5: 1.0})
    assert toy_rule().accept(logits, Draft(tokens=[0]), GREEDY, None) == ([], 4, 0)
    # anchor=digits relaxes content words but never numbers
    logits = logits_for({4: 2.0, 6: 1.99}, {5: 1.0})
    assert toy_rule(anchor="digits").accept(logits, Draft(tokens=[6]), GREEDY, None)[2] == 1
    logits = logits_for({4: 2.0, 7: 1.99}, {5: 1.0})
    assert toy_rule(anchor="digits").accept(logits, Draft(tokens=[7]), GREEDY, None)[2] == 0


def test_ratio_and_topk_bound_the_relaxation():
    # p(" a") / p(" the") = exp(-1.5) = 0.22 < 1 - 0.7: rejected; lam=0.8 accepts it
    logits = logits_for({0: 2.0, 1: 0.5}, {4: 3.0})
    assert toy_rule(lam=0.7).accept(logits, Draft(tokens=[1]), GREEDY, None)[0] == []
    assert toy_rule(lam=0.8).accept(logits, Draft(tokens=[1]), GREEDY, None)[0] == [0]
    # " a" is 3rd: in the top-3, not in the top-2
    logits = logits_for({0: 2.0, 2: 1.95, 1: 1.9}, {4: 3.0})
    assert toy_rule(topk=3).accept(logits, Draft(tokens=[1]), GREEDY, None)[0] == [0]
    assert toy_rule(topk=2).accept(logits, Draft(tokens=[1]), GREEDY, None)[0] == []


def test_position_shift_tolerance():
    # target: " the" " cat" ...; draft: " a" " the" " cat": " the" comes one position late
    logits = logits_for({0: 2.0, 1: 1.9}, {4: 2.0, 0: 0.0}, {4: 2.0}, {5: 1.0})
    draft = Draft(tokens=[1, 0, 4])
    assert toy_rule(shift=1).accept(logits, draft, GREEDY, None) == ([0, 1, 2], 5, 2)
    # without the tolerance the second position (" the" where " cat" is wanted) stops it
    assert toy_rule(shift=0).accept(logits, draft, GREEDY, None) == ([0], 4, 1)


def test_zero_tolerance_equals_strict_on_random_cases():
    g = torch.Generator().manual_seed(0)
    rules = [toy_rule(lam=0.0, shift=0), toy_rule(topk=1, shift=0), toy_rule(anchor="all", shift=0)]
    for _ in range(300):
        k = int(torch.randint(0, 6, (1,), generator=g))
        logits = torch.randn(k + 1, V, generator=g)
        target = logits.argmax(-1)
        # drafts that follow the target for a while, then anything
        toks = [
            int(t)
            if float(torch.rand(1, generator=g)) < 0.7
            else int(torch.randint(0, V, (1,), generator=g))
            for t in target[:k]
        ]
        want = verify_draft(logits, Draft(tokens=toks), GREEDY, None)
        for rule in rules:
            path, nxt, relaxed = rule.accept(logits, Draft(tokens=toks), GREEDY, None)
            assert (path, nxt) == want and relaxed == 0


def test_loose_refuses_sampling_and_trees():
    logits = logits_for({0: 1.0}, {1: 1.0})
    with pytest.raises(VeridraftError, match="greedy"):
        toy_rule().accept(logits, Draft(tokens=[0]), SamplingParams(temperature=0.7), None)
    with pytest.raises(VeridraftError, match="token trees"):
        toy_rule().accept(logits, Draft(tokens=[0], parents=[-1]), GREEDY, None)
    assert math.isinf(toy_rule(lam=1.0)._log_ratio)


class Replay:
    """Drafts a fixed token sequence (from where the output stands), k at a time."""

    name = "replay"

    def __init__(self, seq: list[int], k: int = 3) -> None:
        self.seq, self.k = seq, k

    def prefill(self, ctx) -> None:
        pass

    def propose(self, ctx, max_tokens: int) -> Draft:
        done = len(ctx.ids) - ctx.prompt_len
        return Draft(tokens=self.seq[done : done + min(self.k, max_tokens)])

    def update(self, rnd) -> None:
        pass


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-loose"), layers=2, vocab=V)


def test_decode_with_zero_tolerance_equals_strict(net):
    prompt = [1, 5, 3, 7, 2]
    noisy = [int(x) for x in torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(3))]

    def run(rule):
        return decode(
            net,
            prompt,
            max_new_tokens=30,
            sampling=GREEDY,
            generator=torch.Generator(),
            drafter=Replay(noisy),
            rule=rule,
        )

    strict_ids, strict_stats = run(STRICT)
    plain, _ = decode(net, prompt, max_new_tokens=30, sampling=GREEDY, generator=torch.Generator())
    assert strict_ids == plain
    for rule in (toy_rule(lam=0.0, shift=0), toy_rule(anchor="all", shift=0)):
        ids, stats = run(rule)
        assert ids == strict_ids
        assert stats.accepted == strict_stats.accepted and stats.relaxed == 0
        assert stats.lossy and stats.verify.startswith("loose:")
    # a loose rule that relaxes: still marks itself and counts what it relaxed
    ids, stats = run(toy_rule(anchor="digits", lam=0.99, topk=8))
    assert stats.lossy and stats.relaxed > 0 and "LOSSY" in stats.summary()
    assert not strict_stats.lossy and "LOSSY" not in strict_stats.summary()
