"""Speculation on a compressed target is lossless relative to that compressed target: greedy
ids equal its plain decoding (tiny model, every press; one real model), and sampling fits the
compressed target's exact distribution, with controls that must fail (a drafter lying about q,
and the full model's distribution, which the compressed target does not have)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from drafting_helpers import (
    ACCEPT_P,
    PROMPT,
    REJECT_P,
    SAMPLING,
    chi2_pvalue,
    exact_joint,
    tiny_llama,
)

from veridraft.decode import decode
from veridraft.drafters import ModelDrafter, NgramDrafter
from veridraft.drafters.base import Draft
from veridraft.drafters.model import truncate_layers
from veridraft.generate import generate_ids
from veridraft.presses import PRESSES, make_press, prefill_compressed
from veridraft.sampling import SamplingParams, probs

KV = "snapkv:budget=8,window=4"
N_TOKENS = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("press-spec"), seed=0)


def _pre(net, kv=KV, prompt=PROMPT, room=50):
    return prefill_compressed(net, prompt, len(prompt) + room, make_press(kv))


def compressed_joint(net, n: int) -> np.ndarray:
    """P(first n tokens) of the compressed target, exhaustively (vocab 16)."""
    pre = _pre(net)
    cache, base = pre.cache, len(PROMPT)
    joint = np.zeros([net.config.vocab_size] * n)

    def extend(prefix, logits, pr):
        row = probs(logits, SAMPLING).double().numpy()
        for t in np.nonzero(row)[0]:
            seq = prefix + (int(t),)
            if len(seq) == n:
                joint[seq] = pr * row[t]
            else:
                cache.truncate(base + len(prefix))
                extend(seq, net(torch.tensor([int(t)]), cache)[-1], pr * row[t])

    extend((), pre.logits, 1.0)
    return joint


def sample_counts(net, drafter_fn, n_samples: int, seed: int) -> np.ndarray:
    v = net.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    pre = _pre(net)
    counts = np.zeros(v**N_TOKENS, dtype=np.int64)
    for _ in range(n_samples):
        new, _ = decode(
            net,
            PROMPT,
            max_new_tokens=6,
            sampling=SAMPLING,
            generator=g,
            drafter=drafter_fn(),
            should_stop=lambda new: N_TOKENS if len(new) >= N_TOKENS else None,
            prefilled=pre,
        )
        counts[np.ravel_multi_index(new[:N_TOKENS], [v] * N_TOKENS)] += 1
    return counts


class LyingDrafter:
    """Samples from softmax(4 * logits) but reports a uniform q."""

    name = "lying"

    def __init__(self):
        self.logits = torch.randn(16, generator=torch.Generator().manual_seed(5)) * 1.5

    def prefill(self, ctx):
        pass

    def propose(self, ctx, max_tokens):
        k = min(3, max_tokens)
        toks = torch.multinomial(
            torch.softmax(4 * self.logits, -1), k, True, generator=ctx.generator
        )
        return Draft(toks.tolist(), torch.full((k, 16), 1 / 16))

    def update(self, n_accepted, next_token):
        pass


@pytest.fixture(scope="module")
def joints(tiny):
    return compressed_joint(tiny, N_TOKENS), exact_joint(tiny, PROMPT, N_TOKENS, SAMPLING)


@pytest.mark.parametrize("which", ["plain", "ngram", "model"])
def test_sampling_on_a_compressed_target_fits_its_distribution(tiny, joints, which):
    compressed, _ = joints
    make = {
        "plain": lambda: None,
        "ngram": lambda: NgramDrafter(num_tokens=4, max_ngram=2),
        "model": lambda: ModelDrafter(truncate_layers(tiny, 2), mode="fixed", num_tokens=3),
    }[which]
    counts = sample_counts(tiny, make, 800, seed=1)
    assert chi2_pvalue(counts, compressed) > ACCEPT_P


def test_the_sampling_test_can_fail(tiny, joints):
    compressed, full = joints
    lying = sample_counts(tiny, LyingDrafter, 800, seed=1)
    assert chi2_pvalue(lying, compressed) < REJECT_P
    # the compressed target really samples from another distribution than the full model
    plain = sample_counts(tiny, lambda: None, 800, seed=2)
    assert chi2_pvalue(plain, full) < REJECT_P


@pytest.mark.parametrize("name", list(PRESSES))
def test_greedy_speculation_equals_compressed_plain_decoding_tiny(tiny, name):
    kv = f"{name}:budget=8"
    runs = {}
    for which, drafter in (
        ("plain", None),
        ("ngram", NgramDrafter(num_tokens=4, max_ngram=2)),
        ("model", ModelDrafter(truncate_layers(tiny, 2), mode="fixed", num_tokens=4)),
    ):
        new, stats = decode(
            tiny,
            PROMPT,
            max_new_tokens=30,
            sampling=SamplingParams(),
            generator=torch.Generator(),
            drafter=drafter,
            prefilled=_pre(tiny, kv),
        )
        runs[which] = new
        if drafter is not None:
            assert stats.drafted > 0 and stats.accepted > 0
    assert runs["ngram"] == runs["plain"] and runs["model"] == runs["plain"]


def test_greedy_speculation_equals_compressed_plain_decoding_real(real_model):
    m = real_model("smollm2-135m")
    text = (Path(__file__).parents[2] / "README.md").read_text()[:1500]
    ids = m.tokenizer.encode(text + "\n\nIn one sentence, veridraft is")
    for kv in ("adakv:budget=0.25", "hybridkv:budget=0.25"):  # head-wise and dynamic heads
        outs = {}
        for draft in (None, "ngram", "layerskip"):
            new, stats = generate_ids(m, ids, max_new_tokens=16, draft=draft, kv=kv, warn=False)
            outs[draft] = new
            assert "(lossy)" in stats.method and any("lossy" in n for n in stats.notes)
        assert outs["ngram"] == outs[None] and outs["layerskip"] == outs[None], kv
