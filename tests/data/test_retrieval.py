"""The retrieval set: deterministic for a seed, each needle where the item says (depth and
token position), prompts of the asked length within tolerance, the scorer exact."""

from __future__ import annotations

import json

import pytest

from veridraft.cli import main
from veridraft.data import retrieval as r
from veridraft.errors import VeridraftError
from veridraft.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(real_model_dir):
    return Tokenizer.from_folder(real_model_dir("smollm2-135m"))


@pytest.fixture(scope="module")
def haystack(tmp_path_factory):
    """A small book file of numbered, distinct sentences (fast, and any misplacement shows)."""
    path = tmp_path_factory.mktemp("hay") / "books.jsonl"
    with open(path, "w") as f:
        for b, key in enumerate(["alpha", "beta"]):
            chapters = []
            for c in range(4):
                paras = [
                    " ".join(
                        f"Sentence {b}-{c}-{p}-{s} tells of the garden and the rain."
                        for s in range(8)
                    )
                    for p in range(12)
                ]
                chapters.append({"title": f"CHAPTER {c}", "text": "\n\n".join(paras)})
            f.write(json.dumps({"book": key, "key": key, "chapters": chapters}) + "\n")
    return path


def _set(tok, haystack, **kw):
    kw.setdefault("context", 2048)
    return r.make_set(tok, haystack=haystack, books=("alpha", "beta"), **kw)


def test_deterministic_for_a_seed_and_different_across_seeds(tok, haystack):
    a = _set(tok, haystack, n=3, seed=7, tasks=("single", "multikey"))
    b = _set(tok, haystack, n=3, seed=7, tasks=("single", "multikey"))
    c = _set(tok, haystack, n=3, seed=8, tasks=("single", "multikey"))
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    assert [x.answers for x in a] != [x.answers for x in c]


@pytest.mark.parametrize("task", r.TASKS)
def test_needles_sit_where_the_item_says(tok, haystack, task):
    items = _set(tok, haystack, n=3, tasks=(task,), depths=[0.0, 0.5, 1.0])
    for it in items:
        ids = tok.encode(it.prompt)
        # the prompt fills the context less the answer budget, within 2%
        assert it.prompt_tokens == len(ids)
        assert it.context - it.gen_tokens - 0.02 * it.context <= len(ids)
        assert len(ids) <= it.context - it.gen_tokens
        for nd in it.needles:
            sentence = r.NEEDLE.format(key=nd.key, value=nd.value)
            assert it.prompt[nd.char_start :].startswith(sentence)
            assert it.prompt.count(nd.value) == 1
            # its tokens start at token_start
            assert (
                tok.decode(ids[nd.token_start : nd.token_start + 12])
                .strip()
                .startswith("The special magic number for")
            )
            # measured depth within a sentence or two of the asked one
            assert abs(nd.token_depth - nd.depth) < 0.03
        assert it.needles[0].depth == pytest.approx([0.0, 0.5, 1.0][items.index(it)])
        for q in it.queries:
            assert q in it.prompt.rsplit("\n\n", 1)[1]  # asked in the question
        assert it.prompt.endswith(
            "mentioned in the provided text " + ("is" if len(it.answers) == 1 else "are")
        )


def test_tasks_ask_what_they_should(tok, haystack):
    single, multikey, multivalue, multiquery = (
        _set(tok, haystack, n=1, tasks=(t,))[0] for t in r.TASKS
    )
    assert len(single.needles) == 1 and single.answers == [single.needles[0].value]
    assert len(multikey.needles) == 4 and multikey.answers == [multikey.needles[0].value]
    assert len({n.key for n in multikey.needles}) == 4
    assert {n.key for n in multivalue.needles} == {multivalue.queries[0]}
    assert multivalue.answers == [n.value for n in multivalue.needles]
    assert multiquery.queries == [n.key for n in multiquery.needles]


def test_real_haystack_at_4k(tok):
    (it,) = r.make_set(tok, context="4k", n=1, seed=0)
    assert it.book in r.BOOKS
    assert 4096 - 32 - 82 <= it.prompt_tokens <= 4096 - 32
    assert abs(it.needles[0].token_depth - 0.5) < 0.03


def test_score_is_an_exact_digit_match():
    item = {"answers": ["1234567"]}
    assert r.score(" 1234567.", item) == 1.0
    assert r.score("The number is 1234567 and more", item) == 1.0
    assert r.score(" 12345678", item) == 0.0
    assert r.score(" 91234567", item) == 0.0
    assert r.score(" 123456", item) == 0.0
    assert r.score(" 1,234,567", item) == 0.0
    two = {"answers": ["1111111", "2222222"]}
    assert r.score("2222222 and 1111111", two) == 1.0
    assert r.score("1111111 only", two) == 0.5
    assert r.accuracy(["1111111 2222222", "nothing"], [two, item]) == 0.5
    with pytest.raises(VeridraftError, match="answers for"):
        r.accuracy(["x"], [item, item])


def test_bad_input_is_one_line_error(tok, haystack):
    with pytest.raises(VeridraftError, match="context must be"):
        r.parse_context("lots")
    assert r.parse_context("8k") == 8192 and r.parse_context("3000") == 3000
    with pytest.raises(VeridraftError, match="unknown retrieval task"):
        _set(tok, haystack, n=1, tasks=("nope",))
    with pytest.raises(VeridraftError, match="depths must be in"):
        _set(tok, haystack, n=1, depths=[1.5])
    with pytest.raises(VeridraftError, match="has no book"):
        r.load_books(haystack, ["gamma"])


def test_cli_writes_jsonl_the_api_reads(tmp_path, haystack, real_model_dir):
    real_model_dir("smollm2-135m")
    out = tmp_path / "set.jsonl"
    args = ["data", "retrieval", "--tokenizer", "smollm2-135m", "--context", "2k", "--n", "2"]
    assert (
        main(args + ["--tasks", "single,multiquery", "--haystack", str(haystack), "-o", str(out)])
        == 0
    )
    items = r.read_jsonl(out)
    assert [i.task for i in items] == ["single", "single", "multiquery", "multiquery"]
    assert items[0].tokenizer == "smollm2-135m"
    again = tmp_path / "again.jsonl"
    main(args + ["--tasks", "single,multiquery", "--haystack", str(haystack), "-o", str(again)])
    assert out.read_text() == again.read_text()
