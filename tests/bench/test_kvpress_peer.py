"""The kvpress peer's specs, its ratio from a token budget, and a skipped row (with the reason)
when its venv is missing. The runs themselves need kvpress's venv (make setup-kvpress)."""

from __future__ import annotations

import pytest

from veridraft.bench.kvpress_peer import compression_ratio, make_kvpress_peer, parse
from veridraft.bench.methods import split_methods
from veridraft.errors import VeridraftError


class FakeTok:
    eos_ids = {2}


class FakeModel:
    name = "m"
    path = None
    context_length = 8192
    tokenizer = FakeTok()


def test_specs():
    assert parse("kvpress:ar") == ("ar", {})
    assert parse("kvpress:snapkv:ratio=0.5") == ("snapkv", {"ratio": 0.5})
    assert parse("kvpress:streaming:budget=1024") == ("streaming", {"budget": 1024.0})
    for bad, match in [
        ("kvpress:nope", "unknown kvpress method"),
        ("kvpress:snapkv", "exactly one of"),
        ("kvpress:snapkv:ratio=1.5", "ratio must be in"),
        ("kvpress:snapkv:keep=3", "expected ratio=R or budget=N"),
        ("kvpress:ar:ratio=0.5", "no parameters"),
    ]:
        with pytest.raises(VeridraftError, match=match):
            parse(bad)
    assert split_methods("ar,kvpress:snapkv:ratio=0.5,ngram+loose:topk=3,lam=0.5") == [
        "ar",
        "kvpress:snapkv:ratio=0.5",
        "ngram+loose:topk=3,lam=0.5",
    ]


def test_budget_to_ratio():
    assert compression_ratio({"ratio": 0.25}, 4000) == 0.25
    assert compression_ratio({"budget": 1024.0}, 4096) == pytest.approx(0.75)
    assert compression_ratio({"budget": 1024.0}, 500) == 0.0  # a short prompt is kept whole


def test_missing_venv_skips_the_row_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("VERIDRAFT_KVPRESS_PYTHON", str(tmp_path / "none" / "bin" / "python"))
    m = make_kvpress_peer("kvpress:snapkv:ratio=0.5", FakeModel())
    assert m.skip_reason and "make setup-kvpress" in m.skip_reason
    assert m.info()["engine"] == "kvpress"
