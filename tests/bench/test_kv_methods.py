"""`ar+kv:PRESS` and `DRAFT+kv:PRESS` in --methods: parsed, lossy, measured against their own
compressed plain decoding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from drafting_helpers import tiny_llama

from veridraft.bench.methods import VeridraftMethod, split_methods
from veridraft.errors import VeridraftError
from veridraft.generate import generate_ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("kv-bench"), seed=1)


def test_split_methods_keeps_kv_specs_whole():
    got = split_methods(
        "ar,ar+kv:snapkv:budget=1024,ngram+kv:adakv:budget=0.25,alpha=0.2,layerskip"
    )
    assert got == [
        "ar",
        "ar+kv:snapkv:budget=1024",
        "ngram+kv:adakv:budget=0.25,alpha=0.2",
        "layerskip",
    ]


def test_kv_methods_are_lossy_with_their_own_baseline(tiny):
    tiny = SimpleNamespace(net=tiny, tokenizer=None, name="tiny")
    plain = VeridraftMethod("ar+kv:snapkv:budget=8", tiny)
    plain.prepare()
    assert not plain.lossless and plain.baseline == "ar" and plain.kv == "snapkv:budget=8"
    spec = VeridraftMethod("ngram:num_tokens=4+kv:snapkv:budget=8", tiny)
    spec.prepare()
    assert not spec.lossless and spec.baseline == "ar+kv:snapkv:budget=8"
    assert spec.draft == "ngram:num_tokens=4"
    with pytest.raises(VeridraftError, match="unknown kv press"):
        VeridraftMethod("ar+kv:nope:budget=8", tiny).prepare()


def test_generate_ids_kv_marks_the_run_lossy_and_refuses_lossless(tiny):
    prompt = [3, 7, 1, 9, 12, 4, 3, 7, 1, 0, 2, 5, 6, 8, 10, 11, 13, 14, 15]
    new, stats = generate_ids(tiny, prompt, max_new_tokens=5, kv="streaming:budget=6", warn=False)
    assert len(new) == 5 and stats.method == "ar+kv:streaming:budget=6 (lossy)"
    assert "lossy KV compression" in stats.notes[-1] and "KV memory held" in stats.notes[-1]
    with pytest.raises(VeridraftError, match="lossy") as e:
        generate_ids(tiny, prompt, max_new_tokens=5, kv="streaming:budget=6", lossless=True)
    assert "\n" not in str(e.value)
