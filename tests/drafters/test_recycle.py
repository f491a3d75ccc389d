"""recycle (Token Recycling): the adjacency table, the best-first static tree, and greedy decoding
with it equal to plain decoding on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch
from drafting_helpers import tiny_llama

from veridraft.decode import decode
from veridraft.draft import DecodeContext, Round
from veridraft.drafters import make_drafter
from veridraft.drafters.recycle import RecycleDrafter, tree_shape, update_table
from veridraft.errors import VeridraftError
from veridraft.sampling import SamplingParams
from veridraft.tree import check_parents


def test_tree_shape_is_best_first_with_product_probabilities():
    shape = tree_shape([0.5, 0.2], max_nodes=6)
    probs = [p for _, _, p in shape]
    assert probs == sorted(probs, reverse=True)
    check_parents([parent for parent, _, _ in shape], len(shape))
    for parent, rank, p in shape:
        above = 1.0 if parent < 0 else shape[parent][2]
        assert math.isclose(p, above * [0.5, 0.2][rank])
    # 0.5 (r0), 0.25 (r0 r0), 0.2 (r1), 0.125 (r0 r0 r0), 0.1 (r0 r1 and r1 r0 tie)
    assert [(parent, rank) for parent, rank, _ in shape[:4]] == [(-1, 0), (0, 0), (-1, 1), (1, 0)]


def test_update_table_keeps_each_rows_top_k_and_the_last_repeat():
    table = torch.full((6, 2), -1, dtype=torch.int32)
    scores = torch.tensor(
        [
            [0.0, 5.0, 1.0, 4.0, 0.0, 0.0],  # row for token 2: top-2 = 1, 3
            [9.0, 0.0, 0.0, 0.0, 0.0, 8.0],  # row for token 4: top-2 = 0, 5
            [0.0, 0.0, 7.0, 0.0, 6.0, 0.0],  # token 2 again: the later row wins, 2, 4
        ]
    )
    update_table(table, [2, 4, 2], scores)
    assert table[4].tolist() == [0, 5]
    assert table[2].tolist() == [2, 4]
    assert table[0].tolist() == [-1, -1]  # untouched rows stay unseen


def ctx_for(ids, vocab):
    target = type("T", (), {"config": type("C", (), {"vocab_size": vocab})()})()
    return DecodeContext(
        ids=list(ids),
        prompt_len=len(ids),
        target=target,
        cache=None,
        sampling=SamplingParams(),
        generator=None,
    )


def test_propose_expands_the_shape_through_the_table_and_prunes_unseen_rows():
    d = RecycleDrafter(topk=2, nodes=6, hot=False)
    ctx = ctx_for([1, 3], vocab=8)
    d.prefill(ctx)
    d._table[3] = torch.tensor([5, 6], dtype=torch.int32)
    d._table[5] = torch.tensor([7, 2], dtype=torch.int32)  # 6 and 7 were never seen
    draft = d.propose(ctx, 16)
    check_parents(draft.parents, len(draft.tokens))
    kids = {(draft.parents[i], t) for i, t in enumerate(draft.tokens)}
    assert (-1, 5) in kids and (-1, 6) in kids
    five = draft.tokens.index(5)
    assert (five, 7) in kids
    assert all(0 <= t < 8 for t in draft.tokens)
    assert len(draft.tokens) <= 6
    # a table with nothing for the last token proposes nothing
    ctx.ids.append(4)
    assert d.propose(ctx, 16).tokens == []


def test_update_counts_ranks_and_writes_the_scores_rows():
    d = RecycleDrafter(topk=2, nodes=3, hot=False)
    ctx = ctx_for([1, 3], vocab=8)
    d.prefill(ctx)
    d._table[3] = torch.tensor([5, 6], dtype=torch.int32)
    d._table[5] = torch.tensor([2, 7], dtype=torch.int32)
    draft = d.propose(ctx, 16)
    assert draft.tokens[0] == 5 and 6 in draft.tokens
    scores = torch.zeros(len(draft.tokens) + 1, 8)
    scores[:, 4] = 2.0
    scores[:, 1] = 1.0
    # the target accepted 5 (rank 0 of row 3), then emitted 7 (rank 1 of row 5)
    ctx.ids.extend([5, 7])
    d.update(
        Round(n_accepted=1, next_token=7, drafted=len(draft.tokens), ids=ctx.ids, scores=scores)
    )
    assert d._hits == [1.0, 1.0] and d._trials == 2.0
    for tok in [3, *draft.tokens]:
        assert d._table[tok].tolist() == [4, 1]


def test_bad_parameters_are_one_line_errors():
    with pytest.raises(VeridraftError, match="topk"):
        make_drafter("recycle:topk=0", None)
    with pytest.raises(VeridraftError, match="unknown parameter"):
        make_drafter("recycle:branches=2", None)


def test_greedy_equals_plain_on_a_tiny_model(tmp_path):
    net = tiny_llama(tmp_path, vocab=64)
    g = torch.Generator().manual_seed(1)
    sampling = SamplingParams()
    for seed in range(2):
        prompt = torch.randint(0, 64, (40,), generator=g).tolist()
        plain, _ = decode(
            net, prompt, max_new_tokens=48, sampling=sampling, generator=torch.Generator()
        )
        drafter = make_drafter("recycle:nodes=12", net)
        out, stats = decode(
            net,
            prompt,
            max_new_tokens=48,
            sampling=sampling,
            generator=torch.Generator(),
            drafter=drafter,
        )
        assert out == plain, seed
    assert stats.drafted > 0 and stats.accepted > 0  # the hot table made trees that were hit
