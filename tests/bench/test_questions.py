"""Spec-Bench question files: validation errors name the file and line; task groups; selection."""

import json

import pytest

from veridraft.bench.questions import (
    default_questions_path,
    group_of,
    groups_in,
    load_questions,
    select,
    spread,
)
from veridraft.errors import VeridraftError


def write(tmp_path, lines, name="q.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def row(qid, cat="qa", turns=("hi",)):
    return {"question_id": qid, "category": cat, "turns": list(turns)}


def test_reads_rows_and_groups(tmp_path):
    p = write(tmp_path, [row(1, "writing", ["a", "b"]), "", row(2, "translation"), row(3, "qa")])
    qs = load_questions(p)
    assert [q.question_id for q in qs] == [1, 2, 3]
    assert [q.line for q in qs] == [1, 3, 4]
    assert qs[0].group == "mt_bench" and qs[0].turns == ["a", "b"]
    assert groups_in(qs) == ["mt_bench", "translation", "qa"]
    assert group_of("my_category") == "my_category"


@pytest.mark.parametrize(
    "bad, what",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not an object"),
        ({"question_id": 5, "turns": ["x"]}, "missing field(s) category"),
        ({"question_id": 5.5, "category": "qa", "turns": ["x"]}, "question_id must be"),
        ({"question_id": True, "category": "qa", "turns": ["x"]}, "question_id must be"),
        ({"question_id": 5, "category": "", "turns": ["x"]}, "category must be"),
        ({"question_id": 5, "category": "qa", "turns": "x"}, "turns must be"),
        ({"question_id": 5, "category": "qa", "turns": []}, "turns must be"),
        ({"question_id": 5, "category": "qa", "turns": ["ok", 3]}, "turns[1] must be"),
        (row(1), "already used on line 1"),
    ],
)
def test_format_errors_name_file_and_line(tmp_path, bad, what):
    p = write(tmp_path, [row(1), "", bad])
    with pytest.raises(VeridraftError) as e:
        load_questions(p)
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and what in msg


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(VeridraftError, match="empty"):
        load_questions(write(tmp_path, ["", "  "]))
    with pytest.raises(VeridraftError, match="not found"):
        load_questions(tmp_path / "nope.jsonl")


def test_spread_is_even_and_includes_first():
    assert spread(40, 10) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert spread(3, 10) == [0, 1, 2]
    assert spread(10, 3) == [0, 3, 6]


def test_select_limit_per_group_keeps_file_order(tmp_path):
    rows = [row(i, "qa") for i in range(10)] + [row(100 + i, "rag") for i in range(4)]
    qs = load_questions(write(tmp_path, rows))
    got = select(qs, limit=2)
    assert [q.question_id for q in got] == [0, 5, 100, 102]
    got = select(qs, groups=["rag"], limit=3)
    assert [q.question_id for q in got] == [100, 101, 102]
    assert len(select(qs, groups=["overall"])) == 14
    with pytest.raises(VeridraftError, match="unknown task group"):
        select(qs, groups=["summarization"])
    with pytest.raises(VeridraftError, match="--limit"):
        select(qs, limit=0)


def test_default_file_is_found_and_has_the_dev_set():
    path = default_questions_path()
    qs = load_questions(path)
    assert len(qs) == 240
    assert groups_in(qs) == [
        "mt_bench",
        "translation",
        "summarization",
        "qa",
        "math_reasoning",
        "rag",
    ]
    picked = select(qs, limit=10)
    assert len(picked) == 60
    mt = [q for q in picked if q.group == "mt_bench"]
    assert len({q.category for q in mt}) == 8  # spread across all MT categories
    assert all(len(q.turns) == 2 for q in mt)
