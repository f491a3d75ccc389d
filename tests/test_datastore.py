"""Retrieval datastores: the suffix array, lookup and counting on a tiny corpus, the atomic
build, the tokenizer check, and suffix:datastore= decoding equal to plain decoding."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from drafting_helpers import tiny_llama

from veridraft import datastore
from veridraft.datastore import build_from_ids, load, suffix_array
from veridraft.decode import decode
from veridraft.draft import DraftEnv
from veridraft.drafters import make_drafter
from veridraft.errors import VeridraftError
from veridraft.sampling import SamplingParams

# after (1, 2): 3 4 twice, 3 5 once, 9 once
DOCS = [[1, 2, 3, 4, 7], [8, 1, 2, 3, 4], [1, 2, 3, 5], [6, 1, 2, 9]]


def test_suffix_array_sorts_suffixes_by_ids():
    rng = np.random.default_rng(0)
    for n in (1, 7, 200):
        toks = rng.integers(0, 5, n).astype(np.uint32)
        toks[rng.integers(0, n)] = 70000  # ids past 16 bits sort by value too
        sa = suffix_array(toks)
        want = sorted(range(n), key=lambda i: toks[i:].tolist())
        assert sa.tolist() == want


def test_lookup_counts_continuation_prefixes(tmp_path):
    build_from_ids(DOCS, "tiny", {"tokenizer": "ids"}, root=tmp_path)
    store = load("tiny", root=tmp_path)
    assert store.meta["tokens"] == sum(len(d) + 1 for d in DOCS)
    lo, hi = store.find([1, 2])
    assert hi - lo == 4
    conts, valid, span = store.continuations([0, 1, 2])
    assert span == 2 and len(conts) == 4
    # a continuation stops at its document's end
    assert not valid[[i for i in range(4) if conts[i, 0] == 9][0], 1]
    r = store.speculate([0, 1, 2], max_nodes=8, min_prob=0.0)
    by = {(r.parents[i], t): p for i, (t, p) in enumerate(zip(r.tokens, r.probs))}
    three = r.tokens.index(3)
    assert math.isclose(by[(-1, 3)], 3 / 4) and math.isclose(by[(-1, 9)], 1 / 4)
    assert math.isclose(by[(three, 4)], 2 / 4) and math.isclose(by[(three, 5)], 1 / 4)
    assert r.probs == sorted(r.probs, reverse=True)
    cut = store.speculate([0, 1, 2], max_nodes=8, min_prob=0.5)
    assert cut.tokens[:2] == [3, 4] and min(cut.probs) >= 0.5
    path = store.speculate([0, 1, 2], max_nodes=8, min_prob=0.0, tree=False)
    assert path.tokens[:2] == [3, 4] and path.parents[:2] == [-1, 0]
    assert store.speculate([5, 5, 5], 8, 0.0).tokens == []  # no match: nothing


def test_longest_matching_span_wins(tmp_path):
    build_from_ids([[4, 1, 2, 3], [5, 1, 2, 6], [5, 1, 2, 6]], "span", root=tmp_path)
    store = load("span", root=tmp_path)
    assert store.speculate([0, 1, 2], 4, 0.0).tokens[0] == 6  # (1, 2): 6 twice, 3 once
    assert store.speculate([4, 1, 2], 4, 0.0).tokens == [3]  # (4, 1, 2): only 3


def test_build_is_atomic(tmp_path, monkeypatch):
    build_from_ids(DOCS, "store", root=tmp_path)
    before = (tmp_path / "store" / "tokens.npy").read_bytes()
    real_save = np.save

    def failing_save(path, arr):
        if str(path).endswith("sa.npy"):
            raise KeyboardInterrupt  # interrupted half way through writing
        real_save(path, arr)

    monkeypatch.setattr(datastore.np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        build_from_ids([[9, 9, 9]], "store", root=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        build_from_ids([[9, 9, 9]], "fresh", root=tmp_path)
    monkeypatch.setattr(datastore.np, "save", real_save)
    # the old store is whole, the new one does not exist, no temporary folder is left
    assert (tmp_path / "store" / "tokens.npy").read_bytes() == before
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    datastore._LOADED.clear()
    assert load("store", root=tmp_path).meta["documents"] == len(DOCS)


def test_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(VeridraftError, match="veridraft datastore build"):
        load("missing", root=tmp_path)
    with pytest.raises(VeridraftError, match="name"):
        build_from_ids(DOCS, "../up", root=tmp_path)

    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [1, 2, 3]

    build_from_ids(DOCS, "probe", {"probe": [4, 5]}, root=tmp_path)
    with pytest.raises(VeridraftError, match="tokenizer"):
        load("probe", Tok(), root=tmp_path)
    meta = json.loads((tmp_path / "probe" / "meta.json").read_text())
    assert meta["bytes"] > 0 and "sa_build_s" in meta


def test_suffix_with_a_datastore_equals_plain_decoding(tmp_path):
    net = tiny_llama(tmp_path / "m", vocab=16)
    prompt = torch.randint(0, 16, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    plain, _ = decode(
        net, prompt, max_new_tokens=30, sampling=SamplingParams(), generator=torch.Generator()
    )
    # the corpus holds the answer's pieces (and noise): retrieval must find them
    build_from_ids([plain[:12], plain[10:30], [3, 3, 3]], "answer", root=tmp_path)
    env = DraftEnv(datastore=lambda name, model: load(name, root=tmp_path))
    drafter = make_drafter("suffix:datastore=answer,max_cached=0", net, env=env)
    out, stats = decode(
        net,
        prompt,
        max_new_tokens=30,
        sampling=SamplingParams(),
        generator=torch.Generator(),
        drafter=drafter,
    )
    assert out == plain
    assert stats.accepted >= 10  # most of the answer came from the datastore
