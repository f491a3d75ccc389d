"""suffix (SuffixDecoding): trie counts, scoring and cut-offs on hand-made sequences, the global
trie of earlier outputs, and greedy decoding with it equal to plain decoding."""

from __future__ import annotations

import math

import pytest
import torch
from drafting_helpers import count_trees, tiny_llama

from veridraft.decode import decode
from veridraft.draft import DecodeContext
from veridraft.drafters import make_drafter
from veridraft.drafters.suffix import SuffixDrafter, SuffixTrie
from veridraft.errors import VeridraftError
from veridraft.sampling import SamplingParams
from veridraft.tree import check_parents

# after (1, 2): 3 three times, 4 once; after (1, 2, 3): 5 twice, 6 once
SEQ = [1, 2, 3, 5, 0, 1, 2, 3, 5, 0, 1, 2, 3, 6, 0, 1, 2, 4, 0, 1, 2]


def trie(seq, depth=8):
    t = SuffixTrie(depth)
    t.append(0, seq)
    return t


def node(t, path):
    n = t.root
    for tok in path:
        n = n.kids[tok]
    return n


def test_counts_are_occurrences_of_each_substring():
    t = trie(SEQ)
    assert node(t, [1, 2]).count == 5
    assert node(t, [1, 2, 3]).count == 3
    assert node(t, [1, 2, 3, 5]).count == 2
    assert node(t, [2, 4]).count == 1
    # depth cut: no path longer than max_depth
    short = trie(SEQ, depth=2)
    assert all(not c.kids for c in node(short, [1]).kids.values())


def test_appending_in_pieces_equals_appending_at_once():
    a, b = trie(SEQ), SuffixTrie(8)
    for i in range(0, len(SEQ), 3):
        b.append(0, SEQ[i : i + 3])

    def dump(n, prefix=()):
        out = {prefix: n.count}
        for tok, c in n.kids.items():
            out.update(dump(c, (*prefix, tok)))
        return out

    assert dump(a.root) == dump(b.root)


def test_tree_scores_are_count_ratios_best_first():
    p = trie(SEQ).speculate([0, 1, 2], 8, 0.1, 1.0, 8.0, tree=True)
    check_parents(p.parents, len(p.tokens))
    # (2,) and (1, 2) occur 5 times (the last without a continuation), 3 of them before 3;
    # (0, 1, 2) 4 times, 2 before 3: the shorter matches score higher and win
    assert p.match in (1, 2)
    assert p.tokens[0] == 3 and math.isclose(p.probs[0], 3 / 5)
    assert p.probs == sorted(p.probs, reverse=True)
    for i, parent in enumerate(p.parents):
        assert parent < 0 or p.probs[i] <= p.probs[parent]
    assert math.isclose(p.score, sum(p.probs))


def test_min_prob_and_match_length_limit_the_tree():
    t = trie(SEQ)
    loose = t.speculate([0, 1, 2], 16, 0.0, 1.0, 8.0, tree=True)
    strict = t.speculate([0, 1, 2], 16, 0.4, 1.0, 8.0, tree=True)
    assert len(strict.tokens) < len(loose.tokens)
    assert min(strict.probs) >= 0.4
    # max nodes = floor(match * factor + offset): with factor 1 and offset 0, a match of m
    # ids drafts at most m nodes
    capped = t.speculate([0, 1, 2], 16, 0.0, 1.0, 0.0, tree=True)
    assert 0 < len(capped.tokens) <= capped.match < len(loose.tokens)


def test_path_mode_follows_the_most_frequent_child():
    p = trie(SEQ).speculate([0, 1, 2], 8, 0.1, 1.0, 8.0, tree=False)
    assert p.tokens[:2] == [3, 5]
    assert p.parents == list(range(-1, len(p.tokens) - 1))
    assert math.isclose(p.probs[1], 3 / 5 * 2 / 3)


def test_remove_undoes_append():
    t = SuffixTrie(4)
    t.append(0, [7, 8, 9])
    t.append(1, SEQ)
    t.close(1)
    t.remove(SEQ)
    assert set(t.root.kids) == {7, 8, 9}
    assert node(t, [7, 8, 9]).count == 1


def ctx_for(ids, prompt_len, target):
    return DecodeContext(
        ids=ids,
        prompt_len=prompt_len,
        target=target,
        cache=None,
        sampling=SamplingParams(),
        generator=None,
    )


def test_earlier_outputs_feed_the_global_trie_fifo():
    target = object()
    first = [9, 9, 1, 2, 3, 4]
    d = SuffixDrafter(max_cached=1)
    d.prefill(ctx_for(list(first), 2, target))
    d2 = SuffixDrafter(max_cached=1)  # drafters are made per generation; the trie is shared
    ids = [5, 1, 2]
    d2.prefill(ctx_for(ids, 2, target))
    draft = d2.propose(d2._ctx, 8)
    assert draft.tokens[:2] == [3, 4] and d2.last_source == "global"
    ids.extend([7, 8])  # d2's generation goes on: its output is 2 7 8
    # a third generation files it and evicts the first output (max_cached=1)
    d3 = SuffixDrafter(max_cached=1)
    d3.prefill(ctx_for([6, 6, 6, 6], 2, target))
    assert set(d3._global.trie.root.kids) == {2, 7, 8}
    # other settings keep their own trie
    d4 = SuffixDrafter(max_cached=1, mode="path")
    d4.prefill(ctx_for([5, 1, 2], 2, target))
    assert d4.propose(d4._ctx, 8).tokens == []


def test_bad_parameters_are_one_line_errors():
    with pytest.raises(VeridraftError, match="mode"):
        make_drafter("suffix:mode=bush", None)
    with pytest.raises(VeridraftError, match="min_prob"):
        make_drafter("suffix:min_prob=2", None)


def test_greedy_equals_plain_on_a_tiny_model(tmp_path):
    net = tiny_llama(tmp_path, vocab=16)
    g = torch.Generator().manual_seed(3)
    sampling = SamplingParams()
    for spec in ("suffix", "suffix:mode=path"):
        trees = 0
        for _ in range(2):  # the second generation also drafts from the first's output
            prompt = torch.randint(0, 16, (40,), generator=g).tolist()
            plain, _ = decode(
                net, prompt, max_new_tokens=40, sampling=sampling, generator=torch.Generator()
            )
            drafter = make_drafter(spec, net)
            counted = count_trees(drafter)
            out, stats = decode(
                net,
                prompt,
                max_new_tokens=40,
                sampling=sampling,
                generator=torch.Generator(),
                drafter=drafter,
            )
            assert out == plain, spec
            assert stats.accepted > 0
            trees += counted["trees"]
        assert (trees > 0) == (spec == "suffix")
