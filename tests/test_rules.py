"""Rule specs: parsing, the drafter+rule method grammar, and loose refused wherever a lossless
method was asked for."""

from __future__ import annotations

import pytest

from veridraft.errors import VeridraftError
from veridraft.rules import make_rule, parse_rule, split_method
from veridraft.verify import STRICT


class ToyTok:
    def __len__(self) -> int:
        return 4

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join([" the", ",", " cat", " 7"][i] for i in ids)


def test_parse_and_make():
    assert parse_rule("loose:topk=3,lambda=0.5") == ("loose", {"topk": "3", "lam": "0.5"})
    assert make_rule(None) is STRICT and make_rule("strict") is STRICT
    rule = make_rule("loose:topk=3,lam=0.5,shift=0,anchor=digits", ToyTok())
    assert rule.lossy and (rule.topk, rule.lam, rule.shift, rule.anchor) == (3, 0.5, 0, "digits")
    assert rule.name == "loose:topk=3,lam=0.5,shift=0,anchor=digits"
    d = make_rule("loose", ToyTok())
    assert (d.topk, d.lam, d.shift, d.anchor) == (5, 0.7, 2, "content")
    assert make_rule(d) is d


@pytest.mark.parametrize(
    "spec, match",
    [
        ("lose", "unknown rule 'lose'; valid: loose, strict"),
        ("loose:topk=0", "loose: topk must be an integer >= 1, got '0'"),
        ("loose:topk=many", "loose: topk must be an integer, got 'many'"),
        ("loose:lam=2", "loose: lam must be a number >= 0.0 and <= 1.0, got '2'"),
        ("loose:anchor=nouns", "loose: anchor must be one of all, content, digits, got 'nouns'"),
        ("loose:speed=3", "unknown parameter 'speed' for loose; valid: anchor, lam, shift, topk"),
        ("loose:topk", "loose takes no argument, got 'topk'; parameters go as loose:KEY=VALUE"),
        ("loose:k=3,topk=4", "sets 'topk' twice"),
        ("strict:topk=2", "unknown parameter 'topk' for strict; valid: none"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, match):
    with pytest.raises(VeridraftError) as e:
        make_rule(spec, ToyTok())
    assert match in str(e.value) and "\n" not in str(e.value)


def test_loose_refused_where_lossless_was_asked():
    with pytest.raises(VeridraftError, match="lossy.*lossless"):
        make_rule("loose", ToyTok(), lossless=True)
    with pytest.raises(VeridraftError, match="lossy"):
        make_rule(make_rule("loose", ToyTok()), lossless=True)
    assert make_rule("strict", lossless=True) is STRICT


def test_split_method():
    assert split_method("ngram") == ("ngram", None)
    assert split_method("ngram+loose") == ("ngram", "loose")
    assert split_method("ngram:num_tokens=8+loose:topk=5,lam=0.5") == (
        "ngram:num_tokens=8",
        "loose:topk=5,lam=0.5",
    )
    # other "+" parts (a KV press) stay with the method
    assert split_method("ngram+loose:topk=5+kv:snapkv") == ("ngram+kv:snapkv", "loose:topk=5")
    assert split_method("ngram+Strict") == ("ngram", "Strict")
    assert split_method("ngram+kv:snapkv") == ("ngram+kv:snapkv", None)
    with pytest.raises(VeridraftError, match="names 2 rules"):
        split_method("ngram+loose+strict")
    with pytest.raises(VeridraftError, match="empty part around '\\+'"):
        split_method("ngram+")


def test_rules_and_loose_import_one_way():
    """rules builds loose rules; loose needs nothing of rules (no import cycle)."""
    import ast
    import inspect

    import veridraft.loose

    tree = ast.parse(inspect.getsource(veridraft.loose))
    imported = {
        n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module is not None
    }
    assert "rules" not in imported and "veridraft.rules" not in imported


def test_generate_refuses_loose_when_lossless(real_model):
    from veridraft.generate import generate

    model = real_model("smollm2-135m")
    with pytest.raises(VeridraftError, match="lossy"):
        generate(model, "Hi", max_new_tokens=4, draft="ngram+loose", lossless=True)
    with pytest.raises(VeridraftError, match="lossy"):
        generate(model, "Hi", max_new_tokens=4, draft="ngram", verify="loose:topk=3", lossless=True)
    with pytest.raises(VeridraftError, match="given twice"):
        generate(model, "Hi", max_new_tokens=4, draft="ngram+loose", verify="loose")
    gen = generate(model, "Hi", max_new_tokens=4, draft="ngram", verify="loose")
    assert gen.stats.lossy and gen.stats.verify.startswith("loose:")
