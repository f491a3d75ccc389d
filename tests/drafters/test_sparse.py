"""Sparse-cache drafters (streaming, snapkv, retrieval, topk, pruned): lossless both ways, the
target's cache left as found, selections that honour budgets and kept segments.

Sampling on a tiny random Llama (vocab 16, a 19-id prompt, budgets below it so every view is
sparse) against the exact joint distribution, with a lying control that must fail; greedy exact
match on the tiny model (self, with layerskip, with a draft model) and on smollm2-135m over an
Austen passage.
"""

from __future__ import annotations

import pytest
import torch
from drafting_helpers import (
    ACCEPT_P,
    PROMPT,
    REJECT_P,
    SAMPLING,
    chi2_pvalue,
    dev_questions,
    exact_joint,
    sample_first,
    tiny_llama,
)

from veridraft.decode import decode
from veridraft.drafters import make_drafter
from veridraft.drafters.model import truncate_layers
from veridraft.drafters.streaming import StreamingDrafter
from veridraft.errors import VeridraftError
from veridraft.sampling import SamplingParams

GREEDY = SamplingParams()
N_SAMPLES = 600
SPECS = {
    "streaming": "streaming:budget=8,sinks=2",
    "snapkv": "snapkv:budget=10,window=4",
    "topk": "topk:budget=10,window=4",
    "retrieval": "retrieval:budget=8,chunk=2,refresh=2",
    "pruned": "pruned:keep=0.3,window=4,refresh=2",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    net = tiny_llama(tmp_path_factory.mktemp("tiny-sparse"), seed=0)
    return net, exact_joint(net, PROMPT, 3, SAMPLING)


class LyingStreaming(StreamingDrafter):
    """Drafts from a sharpened distribution but reports the sparse draft's own q."""

    def propose(self, ctx, max_tokens):
        d = super().propose(ctx, max_tokens)
        if d.q is not None:
            sharp = d.q**3
            sharp /= sharp.sum(-1, keepdim=True)
            d.tokens = [int(torch.multinomial(r, 1, generator=ctx.generator)) for r in sharp]
        return d


@pytest.mark.parametrize("which", list(SPECS))
def test_sampling_matches_exact(tiny, which):
    net, joint = tiny
    counts = sample_first(net, PROMPT, make_drafter(SPECS[which], net), N_SAMPLES, 3, SAMPLING, 1)
    assert chi2_pvalue(counts, joint) > ACCEPT_P


def test_sampling_control_is_caught(tiny):
    net, joint = tiny
    liar = LyingStreaming(budget=8, sinks=2, num_tokens=3)
    counts = sample_first(net, PROMPT, liar, N_SAMPLES, 3, SAMPLING, 1)
    assert chi2_pvalue(counts, joint) < REJECT_P


def _decode(net, drafter, n=40, sampling=GREEDY, segments=()):
    return decode(
        net,
        PROMPT,
        max_new_tokens=n,
        sampling=sampling,
        generator=torch.Generator().manual_seed(0),
        drafter=drafter,
        segments=segments,
    )


@pytest.mark.filterwarnings("ignore:layerskip")
def test_greedy_exact_on_tiny_self_layerskip_and_draft_model(tiny):
    net, _ = tiny
    ref, _ = _decode(net, None)
    for spec in SPECS.values():
        for extra in ("", ",attn=1,mlp=2"):
            d = make_drafter(spec + extra, net)
            out, stats = _decode(net, d)
            assert out == ref, spec + extra
            assert stats.drafted > 0 and 0 < stats.accepted, spec + extra
            assert d.sel.views, f"{spec}: the view should be sparse here"
        draft = make_drafter(spec, net)
        draft.net = truncate_layers(net, 2)  # a separate draft model with its own cache
        out, _ = _decode(net, draft)
        assert out == ref, f"{spec} with a draft model"


class Spy:
    """Wraps a drafter; after each propose, records whether the target's cache kept its length
    and its rows (below the length for self-speculation, all of them with a draft model)."""

    def __init__(self, inner, own_cache: bool) -> None:
        self.inner, self.own_cache, self.name, self.seen = inner, own_cache, inner.name, []

    def prefill(self, ctx):
        self.inner.prefill(ctx)

    def propose(self, ctx, k):
        n = ctx.cache.length
        before = [x.clone() for x in ctx.cache.k + ctx.cache.v]
        draft = self.inner.propose(ctx, k)
        after = ctx.cache.k + ctx.cache.v
        cut = None if self.own_cache else n  # a draft model must not write even past the length
        same = all(torch.equal(a[:, :, :cut], b[:, :, :cut]) for a, b in zip(before, after))
        self.seen.append(same and ctx.cache.length == n)
        for v in self.inner.sel.views.values():  # selections are positions, not cache memory
            assert v.untyped_storage().data_ptr() != ctx.cache.k[0].untyped_storage().data_ptr()
        return draft

    def update(self, rnd):
        self.inner.update(rnd)


@pytest.mark.parametrize("which", list(SPECS))
def test_propose_leaves_the_target_rows_alone(tiny, which):
    """Self-speculation writes only past the committed length; a draft model never touches
    the target's cache (the loop also checks length and low-water mark)."""
    net, _ = tiny
    for draft_net in (None, truncate_layers(net, 2)):
        d = make_drafter(SPECS[which], net)
        if draft_net is not None:
            d.net = draft_net
        spy = Spy(d, draft_net is not None)
        _decode(net, spy, n=20)
        assert spy.seen and all(spy.seen)


def test_selections_respect_budget_and_kept_segments(tiny):
    net, _ = tiny
    segments = [("document", 0, 12), ("question", 12, 16)]
    for which, spec in SPECS.items():
        d = make_drafter(spec, net)
        _decode(net, d, n=4, segments=segments)
        for v in d.sel.views.values():
            rows = v if v.dim() == 2 else v[None]
            for row in rows:
                assert set(range(12, 16)) <= set(row.tolist()), which
                assert row.tolist() == sorted(set(row.tolist())), which
                assert all(p < d.sel.upto for p in row.tolist()), which
    d = make_drafter("snapkv:budget=10,window=4", net)
    _decode(net, d, n=4)
    assert all(v.shape == (2, 10) for v in d.sel.views.values())  # per KV head, to budget


def test_bad_specs_are_one_line_errors(tiny):
    net, _ = tiny
    for spec, word in [
        ("streaming:budget=8,sinks=9", "sinks"),
        ("snapkv:pooling=median", "pooling"),
        ("topk:bogus=1", "bogus"),
        ("pruned:keep=2", "keep"),
        ("streaming:layerskip=false,attn=1", "layerskip=false"),
        ("streaming:precision=bf16", "precision"),
    ]:
        with pytest.raises(VeridraftError, match=word) as e:
            make_drafter(spec, net)
        assert "\n" not in str(e.value)
    with pytest.raises(VeridraftError, match="segment"):
        _decode(net, None, n=2, segments=[("question", 5, 40)])


# ------------------------------------------------------------------ smollm2-135m, greedy


def _long_prompt(model, n_tokens: int) -> list[int]:
    """The longest Spec-Bench dev question's text, cut to n_tokens ids: a document to prune."""
    rows = [q["turns"][0] for q in dev_questions({"summarization": 10, "rag": 10})]
    return model.tokenizer.encode(max(rows, key=len))[:n_tokens]


def _check_real(real_model, plain_greedy, specs, n_prompt, n_new):
    model = real_model("smollm2-135m")
    prompt = _long_prompt(model, n_prompt)
    ref = plain_greedy(model, prompt, n_new)
    for spec in specs:
        d = make_drafter(spec, model)
        out, stats = decode(
            model.net,
            prompt,
            max_new_tokens=n_new,
            sampling=GREEDY,
            generator=torch.Generator(),
            drafter=d,
        )
        assert out == ref, spec
        assert d.sel.views and stats.accepted > 0, spec


@pytest.mark.real
def test_greedy_exact_on_smollm2(real_model, plain_greedy):
    specs = [
        "streaming:budget=49",
        "snapkv:budget=49",
        "topk:budget=49",
        "retrieval:budget=48,refresh=2",
        "pruned:refresh=2",
    ]
    _check_real(real_model, plain_greedy, specs, 300, 16)


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.filterwarnings("ignore:layerskip")
def test_greedy_exact_on_smollm2_longer_with_layerskip_and_a_draft_model(real_model, plain_greedy):
    # the self-drafting specs alone run in test_greedy_exact_on_smollm2 (shorter prompt)
    specs = [
        "snapkv:budget=129,layerskip=true",
        "topk:budget=257,attn=14-15,mlp=14-15",
        "retrieval:budget=128,refresh=4",
        "streaming:smollm2-135m-l12:budget=129",
        "pruned:smollm2-135m-l12",
    ]
    _check_real(real_model, plain_greedy, specs, 1200, 64)
