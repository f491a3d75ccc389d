"""Fidelity metrics on hand-made sequences: token agreement, first divergence, exact-match rate,
and their place in a summary and the report."""

from __future__ import annotations

import pytest

from veridraft.bench.fidelity import (
    add_fidelity,
    fidelity,
    fidelity_markdown,
    first_divergence,
    token_agreement,
)
from veridraft.bench.metrics import summarize


def test_token_agreement_and_first_divergence():
    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_agreement([1, 9, 3, 4], [1, 2, 3, 4]) == 0.75  # one substitution
    assert token_agreement([1, 2], [1, 2, 3, 4]) == 0.5  # the missing tail counts as different
    assert token_agreement([], []) == 1.0 and token_agreement([], [1]) == 0.0
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 9, 3], [1, 2, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert first_divergence([5], [1]) == 0


def rec(method, qid, ids, group="g", text=""):
    return {
        "method": method,
        "question_id": qid,
        "repeat": 0,
        "turn": 0,
        "group": group,
        "category": group,
        "ids": ids,
        "text": text,
        "new_tokens": len(ids),
        "wall_s": 1.0,
        "prompt_tokens": 3,
        "stats": None,
    }


def test_fidelity_over_a_set():
    ref = [rec("ar", 1, [1, 2, 3, 4]), rec("ar", 2, [5, 6]), rec("ar", 3, [7, 8, 9, 10])]
    mine = [rec("x", 1, [1, 2, 3, 4]), rec("x", 2, [5, 0]), rec("x", 3, [7, 8, 0, 0])]
    f = fidelity(mine, ref)
    assert f["compared"] == 3 and f["diverged"] == 2
    assert f["exact_match_rate"] == pytest.approx(1 / 3)
    assert f["token_agreement"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert f["token_agreement_pooled"] == pytest.approx(7 / 10)
    assert f["first_divergence_mean"] == pytest.approx(1.5)  # positions 1 and 2
    assert f["first_divergence_median"] == pytest.approx(1.5)
    # a record without a reference is not compared
    assert fidelity([rec("x", 9, [1])], ref)["compared"] == 0


def test_in_summary_and_report():
    records = [
        rec("ar", 1, [1, 2, 3], text="a 1234567"),
        rec("x", 1, [1, 2, 0], text="a 7654321"),
    ]
    info = {
        n: {"engine": "veridraft", "baseline": "ar", "lossless": n == "ar"} for n in ("ar", "x")
    }
    summary = summarize(records, info)
    add_fidelity(summary, records, "ar", score=lambda r: float("1234567" in r["text"]))
    e = summary["table"]["overall"]["x"]
    assert e["fidelity"]["token_agreement"] == pytest.approx(2 / 3)
    assert e["accuracy"] == 0.0 and summary["table"]["overall"]["ar"]["accuracy"] == 1.0
    assert summary["table"]["overall"]["ar"]["fidelity"] is None
    text = "\n".join(fidelity_markdown({"summary": summary}))
    assert "## Fidelity" in text and "| `x` | **lossy** |" in text and "66.7%" in text
