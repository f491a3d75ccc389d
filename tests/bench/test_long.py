"""The long-document suite: context parsing, deterministic task construction, cuts that fit the
model's context, and the per-context summary."""

from __future__ import annotations

import json

import pytest

from veridraft.bench import long
from veridraft.errors import VeridraftError


def _words(text: str) -> list[int]:
    """A stand-in tokenizer: one id per word (ids are word lengths, so they decode back)."""
    return [len(w) for w in text.split()]


def _unwords(ids: list[int]) -> str:
    return " ".join("x" * i for i in ids)


def _chat(msgs: list[dict]) -> list[int]:
    return [0, 0, 0] + _words(" ".join(m["content"] for m in msgs))


@pytest.fixture
def books(tmp_path):
    lines = []
    for b in range(3):
        chapters = [
            {"title": f"CHAPTER {c}", "text": " ".join(f"w{b}{c}{i}" for i in range(n))}
            for c, n in enumerate([500, 3500, 1200, 5000])
        ]
        lines.append(json.dumps({"book": f"Book {b}", "key": f"b{b}", "chapters": chapters}))
    path = tmp_path / "books.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return long.load_books(path)


def build(books, **kw):
    args = dict(
        contexts=[1024, 2048],
        tasks=list(long.LONG_TASKS),
        max_new_tokens=32,
        context_limit=None,
        chat=True,
    )
    return long.build_tasks(books, _words, _unwords, _chat, **{**args, **kw})


def test_parse_context():
    assert long.parse_context("8k") == [8192]
    assert long.parse_context("4k, 2k,7400") == [2048, 4096, 7400]
    assert long.parse_context([2048, "1k"]) == [1024, 2048]
    for bad in ("", "lots", "8"):
        with pytest.raises(VeridraftError, match="--context"):
            long.parse_context(bad)
    with pytest.raises(VeridraftError, match="summarize"):
        long.parse_tasks("continue,summarize")


def test_tasks_are_deterministic_and_exact_in_length(books):
    qs, raw = build(books)
    again, raw2 = build(books)
    assert [(q.question_id, q.category, q.turns) for q in qs] == [
        (q.question_id, q.category, q.turns) for q in again
    ]
    assert raw == raw2
    cats = [q.category for q in qs]
    assert cats == [
        "continue@1k",
        "continue@2k",
        "summarise",
        "questions@1k",
        "questions@2k",
    ]
    cont = [q for q in qs if q.extra["task"] == "continue"]
    assert [len(raw[q.turns[0]]) for q in cont] == [1024, 2048]
    # the 2k cut extends the 1k cut: the same book from its start
    assert raw[cont[1].turns[0]][:1024] == raw[cont[0].turns[0]]
    summ = next(q for q in qs if q.extra["task"] == "summarise")
    assert long.SUMMARY_TOKENS[0] <= summ.extra["tokens"] <= long.SUMMARY_TOKENS[1]
    assert summ.extra["chapter"] == 2 and summ.turns[0].startswith("Summarise")
    qa = [q for q in qs if q.extra["task"] == "questions"]
    assert all(len(q.turns) == 2 for q in qa) and qa[0].extra["book"] != cont[0].extra["book"]


def test_lengths_are_cut_to_the_model_context(books):
    logs = []
    qs, raw = build(books, contexts=[4096], context_limit=3000, log=logs.append)
    cont = next(q for q in qs if q.extra["task"] == "continue")
    assert len(raw[cont.turns[0]]) == 3000 - 32
    assert any("cut to" in m for m in logs)
    # no 3-9k chapter fits 3000 tokens: summarising is skipped and said so
    assert not any(q.extra["task"] == "summarise" for q in qs)
    assert any("summarise" in m and "skipped" in m for m in logs)


def test_questions_need_an_instruction_model(books):
    logs = []
    qs, _ = build(books, chat=False, log=logs.append)
    assert not any(q.extra["task"] == "questions" for q in qs)
    assert any("chat template" in m for m in logs)


def test_long_summary_reports_prefill_and_kv():
    class Cfg:
        n_layers, n_kv_heads, head_dim = 2, 3, 4

    class Net:
        config = Cfg()

    rec = dict(group="continue@2k", prompt_tokens=2000, new_tokens=11, prefill_s=2.0)
    recs = [
        {**rec, "method": "ar", "decode_s": 1.0, "tokens_per_s": 11 / 3.0, "peak_rss_mb": 500},
        {**rec, "method": "hf:ar", "decode_s": 2.0, "tokens_per_s": 11 / 4.0, "peak_rss_mb": 900},
        {**rec, "method": "ngram", "error": "RuntimeError: boom"},
    ]
    rows = {r["method"]: r for r in long.long_summary(recs, Net())}
    assert set(rows) == {"ar", "hf:ar"}
    assert rows["ar"]["prefill_tok_s"] == 1000 and rows["ar"]["decode_tok_s"] == 10
    assert rows["ar"]["kv_bytes"] == 2 * 2 * 3 * 4 * 2011 * 4
    assert rows["hf:ar"]["kv_bytes"] is None
    table = "\n".join(long.long_table(list(rows.values())))
    assert "| continue@2k | ar | 2,000 | 2.00 | 1,000 | 10.0 |" in table
