"""hybrid: suffix trees where their score reaches min_score, the fallback drafter elsewhere;
greedy output equal to plain decoding, the sampling distribution the target's, the spec."""

from __future__ import annotations

import pytest
from drafting_helpers import (
    ACCEPT_P,
    PROMPT,
    SAMPLING,
    chi2_pvalue,
    exact_joint,
    sample_first,
    tiny_llama,
)

from veridraft.decode import decode
from veridraft.drafters import forget_earlier_generations, make_drafter
from veridraft.drafters.hybrid import HybridDrafter
from veridraft.drafters.model import ModelDrafter, truncate_layers
from veridraft.errors import VeridraftError
from veridraft.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-hybrid"), seed=0)


def greedy(net, prompt, drafter=None, n=40):
    kw = dict(max_new_tokens=n, sampling=SamplingParams(), generator=None)
    return decode(net, prompt, drafter=drafter, **kw)


# a prompt that repeats itself, so that the suffix tries have continuations to propose
REPEATS = (PROMPT * 4)[:60]


@pytest.mark.parametrize("fallback", ["ngram:num_tokens=4", "layerskip:attn=1-2", "model"])
def test_greedy_output_is_plain_decodings(net, fallback):
    forget_earlier_generations()
    plain, _ = greedy(net, REPEATS)
    if fallback == "model":
        back = ModelDrafter(truncate_layers(net, 2), mode="fixed", num_tokens=3)
        drafter = HybridDrafter(make_drafter("suffix", net), back, min_score=1.0)
    else:
        drafter = make_drafter(f"hybrid:{fallback}", net)
    got, stats = greedy(net, REPEATS, drafter)
    assert got == plain
    assert stats.drafted > 0
    assert drafter.suffix_rounds > 0 and drafter.fallback_rounds > 0, (
        drafter.suffix_rounds,
        drafter.fallback_rounds,
    )


def test_min_score_chooses_the_source(net):
    forget_earlier_generations()
    never = make_drafter("hybrid:ngram:min_score=1000", net)
    greedy(net, REPEATS, never)
    assert never.suffix_rounds == 0 and never.fallback_rounds > 0
    forget_earlier_generations()
    always = make_drafter("hybrid:ngram:min_score=0", net)
    greedy(net, REPEATS, always)
    # whenever the tries had a draft it was taken; the fallback only filled empty rounds
    assert always.suffix_rounds > never.suffix_rounds


def test_a_plain_suffix_run_does_not_hand_the_hybrid_its_answer(net):
    # the hybrid's suffix part keeps a global trie of its own
    forget_earlier_generations()
    greedy(net, REPEATS, make_drafter("suffix", net))
    h = make_drafter("hybrid:ngram", net)
    assert h.suffix.scope == "hybrid"
    assert h.suffix._settings() != make_drafter("suffix", net)._settings()


@pytest.fixture(scope="module")
def joint(net):
    return exact_joint(net, PROMPT, 3, SAMPLING)


def test_sampling_distribution_is_the_targets_point_masses(net, joint):
    # suffix trees and prompt lookup: both point masses
    drafter = make_drafter("hybrid:ngram:num_tokens=3,min_score=0.5", net)
    counts = sample_first(net, PROMPT, drafter, 1000, 3, SAMPLING, seed=2)
    assert drafter.suffix_rounds > 0 and drafter.fallback_rounds > 0
    assert chi2_pvalue(counts, joint) > ACCEPT_P


@pytest.mark.slow
def test_sampling_distribution_is_the_targets_with_a_sampling_draft_model(net, joint):
    # rounds of point masses and rounds of a draft model's sampled tokens with their q
    back = ModelDrafter(truncate_layers(net, 2), mode="fixed", num_tokens=3)
    drafter = HybridDrafter(make_drafter("suffix", net), back, min_score=0.5)
    counts = sample_first(net, PROMPT, drafter, 1500, 3, SAMPLING, seed=2)
    assert drafter.suffix_rounds > 0 and drafter.fallback_rounds > 0
    assert chi2_pvalue(counts, joint) > ACCEPT_P


def test_spec_parameters_and_errors(net):
    h = make_drafter("hybrid:ngram:num_tokens=5,min_score=2,suffix_max_depth=12", net)
    assert h.min_score == 2 and h.suffix.max_depth == 12 and h.fallback.num_tokens == 5
    assert h.name.startswith("hybrid:ngram")
    with pytest.raises(VeridraftError, match="hybrid needs an argument"):
        make_drafter("hybrid", net)
    with pytest.raises(VeridraftError, match="fallback must be another kind"):
        make_drafter("hybrid:suffix", net)
    with pytest.raises(VeridraftError, match="unknown parameter 'bogus'"):
        make_drafter("hybrid:ngram:bogus=1", net)
    with pytest.raises(VeridraftError, match="min_score"):
        make_drafter("hybrid:ngram:min_score=-1", net)
