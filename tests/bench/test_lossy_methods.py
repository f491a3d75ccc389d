"""Bench methods with a lossy rule are marked lossy; the retrieval suite turns a retrieval set
into raw-prompt questions keyed by item id."""

from __future__ import annotations

from veridraft.bench.methods import VeridraftMethod
from veridraft.bench.run import retrieval_questions
from veridraft.data import retrieval


def test_loose_methods_are_lossy(real_model):
    model = real_model("smollm2-135m")
    loose = VeridraftMethod("ngram+loose:topk=3", model)
    loose.prepare()
    assert loose.draft == "ngram" and loose.verify == "loose:topk=3"
    assert loose.info()["lossless"] is False
    strict = VeridraftMethod("ngram", model)
    strict.prepare()
    assert strict.info()["lossless"] is True


def test_retrieval_questions_from_a_file(real_model, tmp_path):
    model = real_model("smollm2-135m")
    items = retrieval.make_set(model.tokenizer, context=1024, n=2, seed=3)
    path = tmp_path / "set.jsonl"
    retrieval.write_jsonl(items, path)
    src, qs, by_id = retrieval_questions(model, str(path), "", None, 0, print)
    assert src == path and [q.turns[0] for q in qs] == [i.prompt for i in items]
    assert set(by_id) == {q.question_id for q in qs} and qs[0].category == "retrieval-single"
