"""Self-speculation: cache hygiene, the adaptive draft-exiting rule, skip-set selection."""

from __future__ import annotations

import pytest
import torch
from drafting_helpers import tiny_llama

from veridraft.decode import decode
from veridraft.drafters import LayerSkipDrafter, make_drafter
from veridraft.drafters.base import DecodeContext
from veridraft.drafters.layerskip import DEFAULT_SKIPS, heuristic_skip
from veridraft.errors import VeridraftError
from veridraft.models.base import Skip
from veridraft.sampling import SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore:layerskip. no measured skip set")

PROMPT = [1, 5, 2, 9, 4, 4, 7, 3, 0, 11]
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-ls"), seed=3)


class Named:
    """A LoadedModel stand-in: a name and a net."""

    def __init__(self, name, net):
        self.name, self.net = name, net


def ctx_after_prefill(net, sampling=GREEDY):
    cache = net.new_cache(64)
    logits = net(torch.tensor(PROMPT), cache, num_logits=1)
    ids = PROMPT + [int(logits[-1].argmax())]
    return DecodeContext(
        ids=ids,
        prompt_len=len(PROMPT),
        target=net,
        cache=cache,
        sampling=sampling,
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.0)])
def test_propose_leaves_the_verified_cache_untouched(net, sampling):
    ctx = ctx_after_prefill(net, sampling)
    before_k = [k[:, :, : ctx.cache.length].clone() for k in ctx.cache.k]
    length = ctx.cache.length
    d = LayerSkipDrafter(Skip(attn={1}, mlp={2}), gamma=0.0, num_tokens=6)
    d.prefill(ctx)
    draft = d.propose(ctx, 6)
    assert len(draft.tokens) == 6
    assert ctx.cache.length == length
    for a, k in zip(before_k, ctx.cache.k):
        assert torch.equal(a, k[:, :, :length])
    if sampling.greedy:
        assert draft.q is None
    else:
        assert draft.q.shape == (6, net.config.vocab_size)
        assert torch.allclose(draft.q.sum(-1), torch.ones(6))


def test_empty_skip_set_drafts_the_target_itself(net):
    """With nothing skipped the draft is the target: every token is accepted."""
    d = LayerSkipDrafter(Skip(), gamma=0.0, adaptive=False)
    out, stats = decode(
        net,
        PROMPT,
        max_new_tokens=30,
        sampling=SamplingParams(),
        generator=torch.Generator(),
        drafter=d,
    )
    ref, _ = decode(
        net, PROMPT, max_new_tokens=30, sampling=SamplingParams(), generator=torch.Generator()
    )
    assert out == ref
    assert stats.accepted == stats.drafted > 0


def test_confidence_threshold_stops_drafting(net):
    ctx = ctx_after_prefill(net)
    always_stop = LayerSkipDrafter(Skip(attn={1}), gamma=1.0, adaptive=False)
    assert len(always_stop.propose(ctx, 12).tokens) == 1  # the low-confidence token is kept
    never_stop = LayerSkipDrafter(Skip(attn={1}), gamma=0.0, adaptive=False, num_tokens=12)
    assert len(never_stop.propose(ctx, 12).tokens) == 12
    assert len(never_stop.propose(ctx, 5).tokens) == 5


def paper_rule(gamma, ar, drafted, accepted, k=12):
    """Algorithm 2 of Draft & Verify, written out independently."""
    ar = 0.5 * ar + 0.5 * (accepted / drafted)
    if ar < 0.90:
        new = gamma + 0.01
    elif drafted == k:
        new = gamma
    else:
        new = gamma - 0.01
    return 0.9 * gamma + 0.1 * new, ar


def test_adaptive_rule_matches_the_paper():
    d = LayerSkipDrafter(Skip(attn={0}))
    assert (d.gamma, d.num_tokens, d.alpha, d.epsilon, d.beta1, d.beta2) == (
        0.6,
        12,
        0.9,
        0.01,
        0.5,
        0.9,
    )
    gamma, ar = 0.6, 0.0
    rounds = [(5, 5), (12, 12), (12, 12), (12, 12), (3, 3), (4, 1), (12, 0), (7, 7), (7, 7)]
    for drafted, accepted in rounds:
        d._drafted = drafted
        d.update(accepted, 0)
        gamma, ar = paper_rule(gamma, ar, drafted, accepted)
        assert d.gamma == pytest.approx(gamma, abs=1e-12)
        assert d.ar == pytest.approx(ar, abs=1e-12)
    # hand check of the first step: AR = 0.5 < 0.9, so gamma moves 1/10 of the way to 0.61
    d2 = LayerSkipDrafter(Skip(attn={0}))
    d2._drafted = 5
    d2.update(5, 0)
    assert d2.gamma == pytest.approx(0.601)


def test_gamma_carries_over_generations_and_ar_resets(net):
    d = LayerSkipDrafter(Skip(attn={1, 2}, mlp={1, 2}))
    for _ in range(2):
        decode(
            net,
            PROMPT,
            max_new_tokens=20,
            sampling=SamplingParams(),
            generator=torch.Generator(),
            drafter=d,
        )
    gamma = d.gamma
    assert gamma != 0.6
    ctx = ctx_after_prefill(net)
    d.prefill(ctx)
    assert d.ar == 0.0 and d.gamma == gamma


def test_no_update_without_a_draft():
    d = LayerSkipDrafter(Skip(attn={0}))
    d.update(0, 1)
    assert d.gamma == 0.6


# ------------------------------------------------------------------ skip sets from specs


def test_default_skip_sets_are_valid_for_the_catalog_models():
    assert set(DEFAULT_SKIPS) == {"smollm2-135m", "gemma3-270m"}
    layers = {"smollm2-135m": 30, "gemma3-270m": 18}
    for name, skip in DEFAULT_SKIPS.items():
        assert all(0 <= i < layers[name] for i in skip.attn | skip.mlp)
        assert skip.attn or skip.mlp


def test_spec_skip_sets(net):
    model = Named("tiny", net)
    d = make_drafter("layerskip:attn=1-2;mlp=3", model)
    assert d.skip == Skip(attn={1, 2}, mlp={3})
    d = make_drafter("layerskip:attn=0,2,mlp=1-2,num_tokens=5", model)
    assert d.skip == Skip(attn={0, 2}, mlp={1, 2}) and d.num_tokens == 5
    d = make_drafter("layerskip:skip=1,exit=3", model)
    assert d.skip == Skip(attn={1, 3}, mlp={1, 3})
    d = make_drafter("layerskip", model, attn=[2], mlp=())
    assert d.skip == Skip(attn={2})
    d = make_drafter("layerskip:th_stop_draft=0.8,max_step_draft=4", model)
    assert (d.gamma, d.num_tokens) == (0.8, 4)


def test_catalog_name_selects_the_hand_picked_set(net):
    fake = Named("smollm2-135m", type("N", (), {"config": type("C", (), {"n_layers": 30})})())
    assert make_drafter("layerskip:profile=none", fake).skip == DEFAULT_SKIPS["smollm2-135m"]


def test_unknown_model_gets_the_heuristic_with_a_warning(net):
    with pytest.warns(UserWarning, match="no measured skip set"):
        d = make_drafter("layerskip", Named("tiny", net))
    assert d.skip == heuristic_skip(4)
    h = heuristic_skip(32)
    assert h.attn == h.mlp == frozenset(range(8, 24, 2))


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("layerskip:attn=1-9", r"attn must be a layer set .* < 4"),
        ("layerskip:attn=3-1", "attn must be a layer set"),
        ("layerskip:skip=all", "bypasses every layer"),
        ("layerskip:exit=0", "exit must be an integer >= 1"),
        ("layerskip:gamma=2", "gamma must be a number >= 0.0 and <= 1.0"),
        ("layerskip:adaptive=maybe", "adaptive must be true or false"),
        ("layerskip:depth=3", "unknown parameter 'depth'"),
    ],
)
def test_bad_specs(net, spec, msg):
    with pytest.raises(VeridraftError, match=msg):
        make_drafter(spec, Named("tiny", net))
