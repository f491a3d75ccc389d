"""branches=N for the draft-model drafters: the trunk-plus-leaves tree, and greedy decoding with
it equal to plain decoding (tiny random model)."""

from __future__ import annotations

import math

import torch
from drafting_helpers import count_trees, tiny_llama

from veridraft.decode import decode
from veridraft.drafters import make_drafter
from veridraft.drafters.branches import branch_tree
from veridraft.drafters.model import ModelDrafter, truncate_layers
from veridraft.sampling import SamplingParams
from veridraft.tree import check_parents


def test_branch_tree_keeps_the_most_likely_nodes_parents_first():
    trunk, confs = [10, 11, 12], [0.9, 0.5, 0.8]
    alts = [[(20, 0.08)], [(21, 0.4)], [(22, 0.1)]]
    d = branch_tree(trunk, confs, alts, max_nodes=16)
    check_parents(d.parents, len(d.tokens))
    # path probabilities: 10 .9, 11 .45, 21 .36, 12 .36, 20 .08, 22 .045
    assert d.tokens == [10, 11, 21, 12, 20, 22]
    assert d.parents == [-1, 0, 0, 1, -1, 1]
    small = branch_tree(trunk, confs, alts, max_nodes=3)
    assert small.tokens == [10, 11, 21] and small.parents == [-1, 0, 0]
    chain = branch_tree(trunk, confs, [[], [], []], max_nodes=16)
    assert chain.tokens == trunk and chain.parents is None


class Steep:
    """A cost model in which every extra row costs half a one-token forward."""

    def best_nodes(self, probs, context=None):
        mass, best, best_s = 1.0, 0, 1.0
        for n, p in enumerate(probs, 1):
            mass += p
            if mass / (1 + 0.5 * n) > best_s:
                best, best_s = n, mass / (1 + 0.5 * n)
        return best


def test_the_cost_model_cuts_the_tree():
    d = branch_tree([10, 11], [0.99, 0.98], [[(20, 0.005)], [(21, 0.01)]], 16, cost=Steep())
    assert d.tokens == [10, 11] and d.parents is None  # the unlikely leaves do not pay


def test_greedy_branches_equal_plain_on_a_tiny_model(tmp_path):
    net = tiny_llama(tmp_path, vocab=16)
    prompt = torch.randint(0, 16, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    sampling = SamplingParams()
    plain, _ = decode(
        net, prompt, max_new_tokens=32, sampling=sampling, generator=torch.Generator()
    )
    drafters = {
        "model": ModelDrafter(
            truncate_layers(net, 2), branches=3, mode="fixed", num_tokens=4, draft_vocab=0
        ),
        "layerskip": make_drafter("layerskip:attn=1,mlp=1,branches=3,profile=none", net),
    }
    for name, drafter in drafters.items():
        counted = count_trees(drafter)
        out, stats = decode(
            net,
            prompt,
            max_new_tokens=32,
            sampling=sampling,
            generator=torch.Generator(),
            drafter=drafter,
        )
        assert out == plain, name
        assert counted["trees"] > 0 and stats.accepted > 0, name


def test_sampling_keeps_the_chain(tmp_path):
    net = tiny_llama(tmp_path, vocab=16)
    drafter = ModelDrafter(truncate_layers(net, 2), branches=3, mode="fixed", draft_vocab=0)
    prompt = list(range(10))
    out, _ = decode(
        net,
        prompt,
        max_new_tokens=12,
        sampling=SamplingParams(temperature=0.8),
        generator=torch.Generator().manual_seed(0),
        drafter=(d := _Spy(drafter)),
    )
    assert d.trees == 0 and d.rounds > 0 and math.isfinite(len(out))


class _Spy:
    def __init__(self, inner) -> None:
        self.inner, self.name, self.trees, self.rounds = inner, inner.name, 0, 0

    def prefill(self, ctx) -> None:
        self.inner.prefill(ctx)

    def propose(self, ctx, k):
        d = self.inner.propose(ctx, k)
        self.trees += d.parents is not None
        self.rounds += 1
        return d

    def update(self, rnd) -> None:
        self.inner.update(rnd)
