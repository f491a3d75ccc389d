"""Losslessness of every drafter, both ways (docs/design.md, "Lossless").

Sampling, on a tiny random Llama (vocab 16): the joint distribution of the first 3 generated
tokens with each drafter fits the exact distribution computed exhaustively from the model (the
same test passes for plain decoding, and catches a drafter that reports a q it did not sample
from). Greedy, on both catalog models: output ids equal plain decoding's on Spec-Bench prompts.
"""

from __future__ import annotations

from contextlib import contextmanager

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
    prompt_ids,
    sample_first,
    tiny_llama,
)

from veridraft.decode import decode
from veridraft.drafters import (
    LayerSkipDrafter,
    ModelDrafter,
    NgramDrafter,
    draft_head,
    make_drafter,
)
from veridraft.drafters.base import Draft
from veridraft.drafters.draft_head import SubsetHead
from veridraft.drafters.model import truncate_layers
from veridraft.models.base import Skip
from veridraft.sampling import SamplingParams

N_TOKENS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    net = tiny_llama(tmp_path_factory.mktemp("tiny-target"), seed=0)
    joint = exact_joint(net, PROMPT, N_TOKENS, SAMPLING)
    return net, joint


class FixedDistDrafter:
    """Proposes k i.i.d. tokens from softmax(sample_logits) and reports softmax(report_logits)
    as q. Honest when both are the same; otherwise it lies about q."""

    name = "fixed-dist"

    def __init__(self, sample_logits: torch.Tensor, report_logits: torch.Tensor, k: int = 3):
        self.q_true = torch.softmax(sample_logits, -1)
        self.q_reported = torch.softmax(report_logits, -1)
        self.k = k

    def prefill(self, ctx) -> None:
        pass

    def propose(self, ctx, max_tokens: int) -> Draft:
        k = min(self.k, max_tokens)
        toks = torch.multinomial(self.q_true, k, replacement=True, generator=ctx.generator)
        return Draft(toks.tolist(), self.q_reported.expand(k, -1).clone())

    def update(self, n_accepted: int, next_token: int) -> None:
        pass


class LyingDrafter(FixedDistDrafter):
    """Samples from a sharpened distribution (temperature 0.5) but reports the unsharpened one."""

    name = "lying"

    def __init__(self, logits: torch.Tensor, k: int = 3):
        super().__init__(logits / 0.5, logits, k)


def _logits16(seed: int = 5) -> torch.Tensor:
    return torch.randn(16, generator=torch.Generator().manual_seed(seed)) * 1.5


# The production default head: `draft_vocab="auto"` picks the subset head (draft_head.py) for
# vocabularies of at least 2 x AUTO_DRAFT_VOCAB ids (both catalog models). The tiny model's 16
# ids get it when AUTO_DRAFT_VOCAB is 6 (ids 0-5 plus the context's), in the "-auto-head" cases.
AUTO_HEAD = 6

DRAFTERS = {
    "ngram": lambda net: NgramDrafter(num_tokens=4, max_ngram=2),
    "layerskip-q": lambda net: LayerSkipDrafter(Skip(attn={1, 2}, mlp={2}), gamma=0.0),
    "layerskip-q-subset-head": lambda net: LayerSkipDrafter(
        Skip(attn={1, 2}, mlp={2}), gamma=0.0, draft_vocab=6
    ),
    "layerskip-pointmass": lambda net: LayerSkipDrafter(
        Skip(attn={1, 2}, mlp={2}), gamma=0.0, draft_sampling=False
    ),
    "layerskip-default": lambda net: make_drafter("layerskip", net),
    "layerskip-default-auto-head": lambda net: make_drafter("layerskip", net),
    "model-dynamic": lambda net: ModelDrafter(truncate_layers(net, 2), mode="dynamic"),
    "model-fixed-greedy-draft": lambda net: ModelDrafter(
        truncate_layers(net, 1), mode="fixed", num_tokens=3, draft_sampling=False
    ),
    "model-subset-head": lambda net: ModelDrafter(
        truncate_layers(net, 2), mode="fixed", num_tokens=3, draft_vocab=5
    ),
    "model-default-auto-head": lambda net: ModelDrafter(truncate_layers(net, 2)),
    "honest-fixed-dist": lambda net: FixedDistDrafter(_logits16(), _logits16()),
}


def _uses_subset_head(drafter) -> bool:
    return isinstance(getattr(drafter, "_head", None), SubsetHead)


@contextmanager
def _auto_head(which: str):
    """AUTO_DRAFT_VOCAB lowered for the "-auto-head" cases, for as long as the drafter runs (the
    head is chosen at the first prefill)."""
    with pytest.MonkeyPatch.context() as mp:
        if which.endswith("-auto-head"):
            mp.setattr(draft_head, "AUTO_DRAFT_VOCAB", AUTO_HEAD)
        yield


N_SAMPLES = {"model-dynamic": 1500, "model-fixed-greedy-draft": 1500}


@pytest.mark.filterwarnings("ignore:layerskip")
@pytest.mark.parametrize("which", ["plain", *DRAFTERS])
def test_sampling_distribution_matches_exact(tiny, which):
    net, joint = tiny
    n = N_SAMPLES.get(which, 2000)
    with _auto_head(which):
        drafter = None if which == "plain" else DRAFTERS[which](net)
        counts = sample_first(net, PROMPT, drafter, n, N_TOKENS, SAMPLING, seed=1)
    assert chi2_pvalue(counts, joint) > ACCEPT_P


@pytest.mark.filterwarnings("ignore:layerskip")  # the tiny model has no measured skip set
def test_drafters_do_propose_on_the_tiny_model(tiny):
    """The sampling tests above must exercise acceptance and rejection, not empty drafts."""
    net, _ = tiny
    for which, make in DRAFTERS.items():
        with _auto_head(which):
            drafter = make(net)
            _, stats = decode(
                net,
                PROMPT,
                max_new_tokens=40,
                sampling=SAMPLING,
                generator=torch.Generator().manual_seed(0),
                drafter=drafter,
            )
        assert stats.drafted > 0, which
        assert 0 < stats.accepted < stats.drafted, which
        # the cases named for a subset head do draft through one, the others not
        assert _uses_subset_head(drafter) == ("subset-head" in which or "auto-head" in which), which


def test_lying_drafter_is_caught(tiny):
    """A drafter that reports a q it did not sample from breaks losslessness, and the same
    statistic as above detects it."""
    net, joint = tiny
    counts = sample_first(net, PROMPT, LyingDrafter(_logits16()), 2000, N_TOKENS, SAMPLING, seed=1)
    assert chi2_pvalue(counts, joint) < REJECT_P


@pytest.mark.filterwarnings("ignore:layerskip")
def test_greedy_equals_plain_on_tiny(tiny):
    net, _ = tiny
    greedy = SamplingParams()
    ref, _ = decode(net, PROMPT, max_new_tokens=40, sampling=greedy, generator=torch.Generator())
    for which, make in DRAFTERS.items():
        if which == "honest-fixed-dist":
            continue  # a sampling-only drafter (its tokens ignore the context)
        with _auto_head(which):
            out, stats = decode(
                net,
                PROMPT,
                max_new_tokens=40,
                sampling=greedy,
                generator=torch.Generator(),
                drafter=make(net),
            )
        assert out == ref, which
        assert stats.new_tokens == 40


# ------------------------------------------------------------------ real models, greedy

REAL_MODELS = ["smollm2-135m", "gemma3-270m"]
# 3 questions x 2 models x 3 drafters in fp32 (gemma3-270m reads 1.2 GB per token): a minute
# or more per case on AVX2-only CPUs. Other categories and the packed modes: test_precision.py,
# test_exact_quick.py.
QUESTIONS = dev_questions({"summarization": 1, "translation": 1, "math_reasoning": 1})
NEW_TOKENS = 64
DRAFTS = {
    "ngram": "ngram",
    "layerskip": "layerskip",
    "model": "model:{name}-l8",
}


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("draft", list(DRAFTS))
@pytest.mark.parametrize("name", REAL_MODELS)
def test_greedy_equals_plain_on_real_models(real_model, plain_greedy, name, draft):
    model = real_model(name)
    drafter = make_drafter(DRAFTS[draft].format(name=name), model)
    drafted = accepted = 0
    # a draft model pays for its full head (262,144 rows on gemma3-270m) per draft token
    for q in QUESTIONS[:1] if (name, draft) == ("gemma3-270m", "model") else QUESTIONS:
        prompt = prompt_ids(model, q)
        ref = plain_greedy(model, prompt, NEW_TOKENS)
        out, stats = decode(
            model.net,
            prompt,
            max_new_tokens=NEW_TOKENS,
            sampling=SamplingParams(),
            generator=torch.Generator(),
            drafter=drafter,
        )
        assert out == ref, f"{draft} on {name}, question {q['question_id']} ({q['category']})"
        drafted += stats.drafted
        accepted += stats.accepted
    assert drafted > 0 and accepted > 0
