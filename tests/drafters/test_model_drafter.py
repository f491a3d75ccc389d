"""Separate draft model: its own KV cache and rollback, draft-length modes, the HF-style
confidence threshold, first-N-layers drafts, and the same-vocabulary rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from drafting_helpers import CountedNet, tiny_llama

from veridraft.decode import decode
from veridraft.drafters import ModelDrafter, make_drafter
from veridraft.drafters.model import check_same_vocab, roc_threshold, truncate_layers
from veridraft.errors import VeridraftError
from veridraft.models.base import Skip
from veridraft.sampling import SamplingParams

PROMPT = [1, 5, 2, 9, 4, 4, 7, 3, 0, 11, 6, 6]
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-md"), seed=4, layers=4)


class Named:
    def __init__(self, name, net, tokenizer=None):
        self.name, self.net, self.tokenizer = name, net, tokenizer


def run(net, drafter, n=40, sampling=GREEDY, seed=0):
    return decode(
        net,
        PROMPT,
        max_new_tokens=n,
        sampling=sampling,
        generator=torch.Generator().manual_seed(seed),
        drafter=drafter,
    )


def test_truncate_layers_equals_skipping_the_rest(net):
    small = truncate_layers(net, 2)
    assert small.config.n_layers == 2 and net.config.n_layers == 4
    assert small.output.weight.data_ptr() == net.output.weight.data_ptr()  # shared, no copy
    tokens = torch.tensor(PROMPT)
    a = small(tokens, small.new_cache(32))
    b = net(tokens, net.new_cache(32), skip=Skip(attn={2, 3}, mlp={2, 3}))
    assert torch.allclose(a, b, atol=1e-6)
    assert len(small.new_cache(8).k) == 2
    full = net(tokens, net.new_cache(32))
    assert not torch.allclose(full, a)  # the original still runs all its layers
    with pytest.raises(VeridraftError, match="cannot keep 5 layers"):
        truncate_layers(net, 5)


class Checked(ModelDrafter):
    """Compares every proposal with a fresh drafter prefilled on the same ids: the rolled-back
    incremental cache must give the same drafts as a from-scratch one."""

    def propose(self, ctx, max_tokens):
        draft = super().propose(ctx, max_tokens)
        fresh = ModelDrafter(self.net, mode="fixed", num_tokens=self.num_tokens)
        fresh.prefill(ctx)
        again = fresh.propose(ctx, max_tokens)
        assert again.tokens == draft.tokens
        self.rounds = getattr(self, "rounds", 0) + 1
        return draft


@pytest.mark.parametrize("layers", [1, 4])
def test_draft_cache_rolls_back_correctly(net, layers):
    d = Checked(truncate_layers(net, layers), mode="fixed", num_tokens=4)
    out, stats = run(net, d)
    ref, _ = run(net, None)
    assert out == ref
    assert d.rounds > 3
    if layers == 4:  # the draft is the target: everything is accepted, full rounds
        assert stats.accepted == stats.drafted
    else:
        assert 0 < stats.accepted < stats.drafted


def test_draft_cache_is_trimmed_to_the_committed_prefix(net):
    d = ModelDrafter(truncate_layers(net, 1), mode="fixed", num_tokens=5)
    seen = []
    orig_update = d.update

    def update(n_acc, nxt):
        orig_update(n_acc, nxt)
        seen.append((d.cache.length, list(d._cached_ids)))

    d.update = update
    out, _ = run(net, d, n=25)
    ids = PROMPT + out
    for length, cached in seen:
        assert len(cached) == length
        assert cached == ids[:length]


def test_sampling_returns_q_and_greedy_returns_point_masses(net):
    d = ModelDrafter(truncate_layers(net, 2), mode="fixed", num_tokens=3)
    seen = []
    orig = d.propose

    def spy(ctx, k):
        draft = orig(ctx, k)
        seen.append(draft)
        return draft

    d.propose = spy
    run(net, d, n=10, sampling=SamplingParams(temperature=1.0))
    assert all(x.q is not None and x.q.shape == (len(x.tokens), 16) for x in seen)
    seen.clear()
    run(net, d, n=10)
    assert all(x.q is None for x in seen)
    seen.clear()
    d.draft_sampling = False
    run(net, d, n=10, sampling=SamplingParams(temperature=1.0))
    assert all(x.q is None for x in seen)


def _round_lengths(net, drafter, n=40, sampling=GREEDY):
    lengths = []
    orig = drafter.propose

    def spy(ctx, k):
        draft = orig(ctx, k)
        lengths.append(len(draft.tokens))
        return draft

    drafter.propose = spy
    run(net, drafter, n=n, sampling=sampling)
    return lengths


def test_dynamic_threshold_bounds_the_draft(net):
    d = ModelDrafter(truncate_layers(net, 2), mode="dynamic", num_tokens=6, threshold=0.0)
    d.update = lambda n, t, _u=d.update: (_u(n, t), setattr(d, "threshold", 0.0))
    assert max(_round_lengths(net, d)) == 6
    d = ModelDrafter(truncate_layers(net, 2), mode="dynamic", num_tokens=6, threshold=1.0)
    d.update = lambda n, t, _u=d.update: (_u(n, t), setattr(d, "threshold", 1.0))
    assert set(_round_lengths(net, d)) == {1}


def test_dynamic_threshold_adapts(net):
    d = ModelDrafter(truncate_layers(net, 1), mode="dynamic", num_tokens=8)
    run(net, d, n=60)
    assert len(d._hist_p) == len(d._hist_m) > 5
    assert d.threshold == roc_threshold(d._hist_p, d._hist_m)
    assert d.threshold != 0.4


def test_heuristic_schedule(net):
    # the draft is the target: every round fully accepted, so k grows by 2 each round
    d = ModelDrafter(truncate_layers(net, 4), mode="heuristic", num_tokens=2)
    lengths = _round_lengths(net, d, n=40)
    assert lengths[:3] == [2, 4, 6]
    # a poor draft shrinks k down to 1
    d = ModelDrafter(truncate_layers(net, 1), mode="heuristic", num_tokens=6)
    lengths = _round_lengths(net, d, n=60)
    assert lengths[0] == 6 and min(lengths) == 1


def brute_roc(scores, labels):
    """Pick among thresholds = distinct scores (positive iff score >= t) the one minimising
    FPR + 3 FNR; ties go to the highest threshold (sklearn's curve order + np.argmin)."""
    pos = sum(labels)
    neg = len(labels) - pos
    best = None
    for t in sorted(set(scores), reverse=True):
        tp = sum(1 for s, y in zip(scores, labels) if s >= t and y)
        fp = sum(1 for s, y in zip(scores, labels) if s >= t and not y)
        cost = fp / neg + 3 * (1 - tp / pos)
        if best is None or cost < best[0] - 1e-12:
            best = (cost, t)
    return best[1]


def test_roc_threshold_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(6, 40))
        scores = list(np.round(rng.random(n), 2))  # ties included
        labels = [int(s + rng.normal(0, 0.3) > 0.5) for s in scores]
        if 0 < sum(labels) < n:
            assert roc_threshold(scores, labels) == brute_roc(scores, labels)
    assert roc_threshold([0.5, 0.6], [1, 1]) is None


def test_vocab_mismatch_is_refused(net, tmp_path):
    other = tiny_llama(tmp_path / "v24", seed=1, vocab=24)
    with pytest.raises(VeridraftError, match=r"universal:small-24"):
        check_same_vocab(Named("tiny", net), Named("small-24", other), "small-24")
    check_same_vocab(Named("tiny", net), Named("tiny-l2", truncate_layers(net, 2)), "tiny-l2")


def test_model_spec_with_the_targets_first_layers(net):
    d = make_drafter("model:tiny-l2:k=3,mode=fixed", Named("tiny", net))
    assert d.name == "model:tiny-l2"
    assert d.net.config.n_layers == 2 and (d.mode, d.num_tokens) == ("fixed", 3)
    d = make_drafter("model:tiny-l3", Named("tiny", net), num_assistant_tokens=7)
    assert (d.mode, d.num_tokens, d.threshold) == ("dynamic", 7, 0.4)
    out, _ = run(net, d)
    ref, _ = run(net, None)
    assert out == ref


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("model", "model needs an argument: model:NAME"),
        ("model:tiny-l2:mode=sometimes", "mode must be one of dynamic, fixed, heuristic"),
        ("model:tiny-l2:k=0", "num_tokens must be an integer >= 1"),
        ("model:tiny-l9", "cannot keep 9 layers"),
        ("model:tiny-l2:threshold=1.5", "threshold must be a number"),
    ],
)
def test_bad_model_specs(net, spec, msg):
    with pytest.raises(VeridraftError, match=msg):
        make_drafter(spec, Named("tiny", net))


@pytest.mark.real
def test_real_vocab_mismatch_points_to_universal(real_model):
    target = real_model("smollm2-135m")
    with pytest.raises(VeridraftError, match=r"universal:gemma3-270m"):
        make_drafter("model:gemma3-270m", target)


@pytest.mark.real
def test_real_first_layers_pair(real_model):
    target = real_model("smollm2-135m")
    d = make_drafter("model:smollm2-135m-l8", target)
    assert d.net.config.n_layers == 8
    assert d.net.tok_embeddings.weight.data_ptr() == target.net.tok_embeddings.weight.data_ptr()


def test_subset_head_scores_equal_the_full_head_on_the_subset(net):
    from veridraft.drafters.draft_head import SubsetHead
    from veridraft.models.base import Capture

    head = SubsetHead(net, 6)
    ids = [1, 12, 3, 9, 12]
    head.observe(ids)
    assert head.extra_ids == [12, 9]
    cache = net.new_cache(16)
    cap = Capture(hidden_layers=(-1,))
    full = net(torch.tensor(ids), net.new_cache(16))[-1]
    none = net(torch.tensor(ids), cache, capture=cap, num_logits=0)
    assert none.shape[0] == 0
    sub = head.logits(cap.hidden[-1][-1])
    want = torch.cat((full[:6], full[torch.tensor([12, 9])]))
    assert torch.allclose(sub, want, atol=1e-5)
    row = head.full(sub)
    assert torch.isinf(row[6:9]).all() and row[12] == sub[6]
    ids.append(15)  # ctx.ids grows in place
    head.observe(ids)
    assert head.extra_ids == [12, 9, 15]


def test_auto_draft_vocab(net):
    from veridraft.drafters.draft_head import AUTO_DRAFT_VOCAB, resolve_draft_vocab

    assert resolve_draft_vocab("model", "auto", net) == 0  # 16 ids: the full head
    big = type("Net", (), {})()
    big.config = type("C", (), {"vocab_size": 49152, "tie_embeddings": True})()
    big.tok_embeddings = type("E", (), {"weight": torch.zeros(49152, 4)})()
    assert resolve_draft_vocab("model", "auto", big) == AUTO_DRAFT_VOCAB
    assert resolve_draft_vocab("model", "100", big) == 100
    with pytest.raises(VeridraftError, match="draft_vocab must be an integer >= 0"):
        resolve_draft_vocab("model", "lots", big)


def test_the_prompt_pass_waits_for_the_first_draft(net):
    from veridraft.decode import DecodeContext

    small = truncate_layers(net, 2)
    counted = CountedNet(small)
    d = ModelDrafter(counted, label="model:first-2", mode="fixed")
    ids = [*PROMPT, 8]  # the prompt and the first token
    ctx = DecodeContext(
        ids=ids,
        prompt_len=len(PROMPT),
        target=net,
        cache=net.new_cache(32),
        sampling=GREEDY,
        generator=torch.Generator().manual_seed(0),
        max_new_tokens=10,
    )
    d.prefill(ctx)
    assert counted.rows == []  # prefill runs nothing
    assert d.propose(ctx, 0).tokens == [] and counted.rows == []  # nor does a cap of 0
    ids.extend([3, 3])  # two rounds committed without drafts
    drafted = d.propose(ctx, 3).tokens
    # the prompt's pass (every id before the last), then one row per draft step
    assert counted.rows == [len(ids) - 1, 1, 1, 1]
    # the drafts are the draft model's own greedy continuation of the ids
    alone, _ = decode(small, ids, max_new_tokens=3, sampling=GREEDY, generator=None)
    assert drafted == alone


def test_the_vocabulary_comparison_runs_once_per_pair_of_tokenizers(net):
    """Reading two whole vocabularies costs a quarter of a second on Qwen's: a server that makes
    a drafter per request compares each pair of tokenizers once, and a mismatch stays refused."""
    from types import SimpleNamespace

    reads = []

    class Tok:  # a tokenizer as veridraft's wrapper holds one: .backend.get_vocab()
        def __init__(self, vocab):
            self.backend = SimpleNamespace(get_vocab=lambda with_added_tokens=True: self.read())
            self.vocab = vocab

        def read(self):
            reads.append(1)
            return dict(self.vocab)

    target = Named("t", net, Tok({"a": 0, "b": 1}))
    same = Named("s", net, Tok({"a": 0, "b": 1}))
    other = Named("o", net, Tok({"a": 0, "c": 1}))
    for _ in range(3):
        check_same_vocab(target, same, "s")
    assert len(reads) == 2  # both vocabularies, once
    for _ in range(2):
        with pytest.raises(VeridraftError, match="does not share the tokenizer"):
            check_same_vocab(target, other, "o")
    assert len(reads) == 4
