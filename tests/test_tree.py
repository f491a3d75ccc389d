"""Token trees: masks and positions, the tree forward (row invariance against chains, in fp32
and bitwise in bf16), cache compaction, tree verification (a one-branch tree decides as the
chain does; greedy walk; sampling keeps the target distribution, with a control that must fail),
and greedy decoding of tree drafts equal to plain decoding."""

from __future__ import annotations

import pytest
import torch
import transformers
from scipy.stats import chisquare

from veridraft.decode import decode
from veridraft.draft import Draft
from veridraft.errors import VeridraftError
from veridraft.models import from_folder
from veridraft.sampling import SamplingParams, probs, sample
from veridraft.tree import (
    ancestor_rows,
    check_parents,
    children,
    depths,
    positions,
    tree_attn,
    tree_mask,
)
from veridraft.verify import verify, verify_tree

#        -1 (root)
#       /        \
#      0          2
#      |          |
#      1          4
#      |
#      3
PARENTS = [-1, 0, -1, 1, 2]


def test_depths_rows_children_positions():
    assert depths(PARENTS) == [1, 2, 1, 3, 2]
    assert ancestor_rows(PARENTS) == [[0], [0, 1], [0, 1, 2], [0, 3], [0, 1, 2, 4], [0, 3, 5]]
    assert children(PARENTS) == [[0, 2], [1], [3], [4], [], []]
    assert positions(PARENTS, 10) == [10, 11, 12, 11, 13, 12]
    assert tree_attn(PARENTS).depth.tolist() == [0, 1, 2, 1, 3, 2]


def test_tree_mask_sees_prefix_root_and_ancestors_only():
    m = tree_mask(PARENTS, prefix=2)
    assert m.shape == (6, 8)
    assert m[:, :2].all()  # the cached prefix
    new = m[:, 2:].int().tolist()
    assert new == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [1, 1, 1, 0, 1, 0],
        [1, 0, 0, 1, 0, 1],
    ]


@pytest.mark.parametrize(
    "parents, n, msg",
    [
        ([0], 1, "parent 0"),
        ([-1, 2, -1], 3, "parent 2"),
        ([-2], 1, "parent -2"),
        ([-1], 2, "one parent per token"),
    ],
)
def test_bad_parents_are_one_line_errors(parents, n, msg):
    with pytest.raises(VeridraftError, match=msg):
        check_parents(parents, n)


# -- the tree forward --

COMMON = dict(
    vocab_size=32,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, initializer_range=0.25),
    # window 6 < prefix + depth: the sliding layers must cut the prefix per node position
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **COMMON,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"] * 2,
        final_logit_softcapping=5.0,
    ),
}


def build(cfg, folder, precision="fp32"):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(folder)
    return from_folder(folder, precision=precision)


@pytest.fixture(scope="module", params=list(CONFIGS))
def net(request, tmp_path_factory):
    return build(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))


PREFIX = [3, 1, 4, 1, 5, 9, 2, 6, 5]
ROOT = 7
TOKENS = [8, 2, 8, 3, 1]  # siblings 0 and 2 share a token: only the position mask tells them apart


def path_of(node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(node)
        node = PARENTS[node]
    return out[::-1]


def tree_and_chains(net):
    cache = net.new_cache(64)
    net(torch.tensor(PREFIX), cache)
    start = cache.length
    logits = net(torch.tensor([ROOT, *TOKENS]), cache, tree=tree_attn(PARENTS))
    chains = []
    for node in range(len(TOKENS)):
        c = net.new_cache(64)
        net(torch.tensor(PREFIX), c)
        path = path_of(node)
        chains.append((path, net(torch.tensor([ROOT, *(TOKENS[i] for i in path)]), c), c))
    return cache, start, logits, chains


def test_tree_rows_equal_their_paths_run_as_chains(net):
    _, _, logits, chains = tree_and_chains(net)
    for node, (_, chain_logits, _) in enumerate(chains):
        torch.testing.assert_close(logits[node + 1], chain_logits[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[0], chains[0][1][0], rtol=1e-4, atol=1e-4)
    # a control: the same tokens as one chain give other logits (the mask matters)
    c = net.new_cache(64)
    net(torch.tensor(PREFIX), c)
    flat = net(torch.tensor([ROOT, *TOKENS]), c)
    assert not torch.allclose(flat[5], logits[5], atol=1e-3)


def test_keep_compacts_the_accepted_path_like_a_chain(net):
    cache, start, _, chains = tree_and_chains(net)
    path, _, chain_cache = chains[4]  # nodes 2, 4
    cache.mark()
    cache.keep(start + 1, [start + 1 + i for i in path])
    cache.truncate(start + 1 + len(path))
    assert cache.low_water >= start + 1
    assert cache.length == chain_cache.length
    for layer in range(len(cache.k)):
        n = cache.length
        torch.testing.assert_close(cache.k[layer][:, :, :n], chain_cache.k[layer][:, :, :n])
        torch.testing.assert_close(cache.v[layer][:, :, :n], chain_cache.v[layer][:, :, :n])


def test_tree_forward_rejects_a_mismatched_tree(net):
    cache = net.new_cache(16)
    with pytest.raises(VeridraftError, match="one row per tree node"):
        net(torch.tensor([1, 2]), cache, tree=tree_attn(PARENTS))


def test_bf16_tree_rows_are_bitwise_their_chains(tmp_path):
    """In bf16 (row-wise attention) a node's logits are bitwise those of its path as a chain."""
    cfg = transformers.Gemma3TextConfig(
        **{**COMMON, "hidden_size": 256, "num_hidden_layers": 3},
        head_dim=64,
        sliding_window=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    net = build(cfg, tmp_path, precision="bf16")
    assert net.rowwise_attention
    _, _, logits, chains = tree_and_chains(net)
    for node, (_, chain_logits, _) in enumerate(chains):
        assert torch.equal(logits[node + 1], chain_logits[-1]), node


# -- verification --


def random_logits(n, v=8, seed=0):
    return torch.randn(n + 1, v, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("with_q", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_one_branch_tree_decides_exactly_as_the_chain(with_q, temperature):
    sp = SamplingParams(temperature=temperature)
    for seed in range(40):
        logits = random_logits(4, seed=seed)
        p = probs(logits, SamplingParams(temperature=1.0))
        tokens = torch.multinomial(p[:4], 1, generator=torch.Generator().manual_seed(seed))
        q = None
        if with_q:
            q = torch.softmax(torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)), -1)
        tokens = tokens.flatten().tolist()
        chain = verify(logits, Draft(tokens, q), sp, torch.Generator().manual_seed(seed))
        tree = verify_tree(
            logits, Draft(tokens, q, parents=[-1, 0, 1, 2]), sp, torch.Generator().manual_seed(seed)
        )
        assert (list(range(chain[0])), chain[1]) == tree


def test_greedy_walk_takes_the_first_matching_child():
    v = 10
    logits = torch.zeros(6, v)
    argmax = [8, 3, 0, 2, 9, 1]  # per row: root, nodes 0..4
    for r, a in enumerate(argmax):
        logits[r, a] = 1.0
    # the root's argmax 8 matches nodes 0 and 2: node 0 (first) is taken; row 1 wants 3 != 2
    assert verify_tree(logits, Draft([8, 2, 8, 3, 1], parents=PARENTS), SamplingParams(), None) == (
        [0],
        3,
    )
    # node 0 no longer matches 8, node 2 does; node 2's row (3) now wants 1 == node 4
    logits[3] = 0.0
    logits[3, 1] = 1.0
    assert verify_tree(logits, Draft([7, 2, 8, 3, 1], parents=PARENTS), SamplingParams(), None) == (
        [2, 4],
        argmax[5],
    )


# -- sampling statistics --

V = 4
P1 = torch.tensor([0.4, 0.3, 0.2, 0.1])
# P2[x1]: the target's distribution of the second token after x1
P2 = torch.tensor(
    [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.05, 0.05, 0.1, 0.8]]
)
Q1 = torch.tensor([0.1, 0.2, 0.3, 0.4])
Q2 = torch.tensor([0.4, 0.1, 0.4, 0.1])


def rejection_no_residual(logits, draft, sampling, gen):
    """The control: each sibling is tested against p itself, never against the residual."""
    p = probs(logits, sampling)
    kids = children(draft.parents)
    row, path = 0, []
    while True:
        for c in kids[row]:
            x = draft.tokens[c]
            qx = 1.0 if draft.q is None else float(draft.q[c, x])
            if float(torch.rand(1, generator=gen, dtype=torch.float64)) < min(1, p[row, x] / qx):
                path.append(c)
                row = c + 1
                break
        else:
            return path, sample(p[row], gen)


def two_tokens(rule, sampled: bool, trials: int, seed: int) -> torch.Tensor:
    """Counts [V, V] of the first two emitted tokens. The tree: three children of the root
    (sampled i.i.d. from Q1, or the fixed 0, 1, 2), each with two children (i.i.d. from Q2, or
    the fixed 2, 3); a token not decided this round is drawn from the target, as the next round
    would."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V)
    sp = SamplingParams(temperature=1.0)
    parents = [-1, 0, 0, -1, 3, 3, -1, 6, 6]
    for _ in range(trials):
        if sampled:
            top = torch.multinomial(Q1, 3, replacement=True, generator=gen).tolist()
            low = torch.multinomial(Q2, 6, replacement=True, generator=gen).tolist()
            q = torch.stack([Q1, Q2, Q2] * 3)
        else:
            top, low, q = [0, 1, 2], [2, 3] * 3, None
        tokens = [top[0], *low[0:2], top[1], *low[2:4], top[2], *low[4:6]]
        logits = torch.stack(
            [P1.log(), *(P2[tokens[i]].log() if i % 3 == 0 else P1.log() for i in range(9))]
        )
        path, nxt = rule(logits, Draft(tokens, q, parents=parents), sp, gen)
        out = [tokens[i] for i in path] + [nxt]
        if len(out) < 2:
            out.append(sample(P2[out[0]], gen))
        counts[out[0], out[1]] += 1
    return counts


@pytest.mark.parametrize("sampled", [False, True])
def test_tree_sampling_keeps_the_target_distribution(sampled):
    trials = 6000
    want = (P1[:, None] * P2).flatten() * trials
    good = two_tokens(verify_tree, sampled, trials, seed=1).flatten()
    assert chisquare(good.numpy(), want.numpy()).pvalue > 1e-3
    bad = two_tokens(rejection_no_residual, sampled, trials, seed=1).flatten()
    assert chisquare(bad.numpy(), want.numpy()).pvalue < 1e-6


# -- decoding --


class TreeOracle:
    """Proposes, at every round, a wrong branch first and the target's own greedy continuation
    (from a plain run) second, so accepted paths go through the second child."""

    name = "oracle-tree"

    def __init__(self, reference: list[int], prompt_len: int) -> None:
        self.reference, self.prompt_len = reference, prompt_len

    def prefill(self, ctx) -> None:
        pass

    def propose(self, ctx, max_tokens):
        done = len(ctx.ids) - self.prompt_len
        good = self.reference[done : done + 3][: max_tokens - 2]
        if len(good) < 1 or max_tokens < 3:
            return Draft([])
        wrong = [(t + 1) % 32 for t in good[:2]]
        tokens = [*wrong, *good]
        parents = [-1, 0, -1, *range(2, 2 + len(good) - 1)]
        return Draft(tokens, parents=parents)

    def update(self, rnd) -> None:
        pass


def test_greedy_tree_decoding_equals_plain_decoding(net):
    prompt = PREFIX
    plain, _ = decode(
        net, prompt, max_new_tokens=16, sampling=SamplingParams(), generator=torch.Generator()
    )
    reference = plain  # ids after the prompt, the first one included
    spec, stats = decode(
        net,
        prompt,
        max_new_tokens=16,
        sampling=SamplingParams(),
        generator=torch.Generator(),
        drafter=TreeOracle(reference, len(prompt)),
    )
    assert spec == plain
    assert stats.accepted > 0
