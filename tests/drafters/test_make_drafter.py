"""Spec strings: parsing, the registry, option overrides and one-line errors."""

from __future__ import annotations

import inspect

import pytest

from veridraft.drafters import DRAFTERS, NgramDrafter, make_drafter, parse_spec
from veridraft.errors import VeridraftError
from veridraft.spec import Param


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("ngram", ("ngram", None, {})),
        ("NGram", ("ngram", None, {})),
        ("ngram:num_tokens=8,max_ngram=3", ("ngram", None, {"num_tokens": "8", "max_ngram": "3"})),
        (
            "ngram: num_tokens = 8 ; max_ngram=3",
            ("ngram", None, {"num_tokens": "8", "max_ngram": "3"}),
        ),
        ("layerskip:attn=1-3,5;mlp=4-6", ("layerskip", None, {"attn": "1-3,5", "mlp": "4-6"})),
        ("layerskip:attn=1-3,5,mlp=4-6", ("layerskip", None, {"attn": "1-3,5", "mlp": "4-6"})),
        ("layerskip:attn=,mlp=2", ("layerskip", None, {"attn": "", "mlp": "2"})),
        ("model:smollm2-135m-l8", ("model", "smollm2-135m-l8", {})),
        ("model:NAME:k=4,mode=fixed", ("model", "NAME", {"k": "4", "mode": "fixed"})),
        ("model:C:/models/x", ("model", "C:/models/x", {})),
        ("model:C:/models/x:k=2", ("model", "C:/models/x", {"k": "2"})),
        ("model:org/name", ("model", "org/name", {})),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("", r"empty drafter spec; valid: (\w+, )*layerskip, model, ngram, "),
        (":x", "has no name before ':'"),
        ("ngram:num_tokens=2,num_tokens=3", "sets 'num_tokens' twice"),
        ("model::k=2", "empty argument"),
    ],
)
def test_parse_errors(spec, msg):
    with pytest.raises(VeridraftError, match=msg):
        parse_spec(spec)


def test_registry_lists_the_methods():
    assert set(DRAFTERS) >= {"ngram", "layerskip", "model"}
    for name, cls in DRAFTERS.items():
        entry = DRAFTERS.entry(name)
        assert entry.name == cls.name == name and entry.target is cls
        assert entry.description and "\n" not in entry.description
        assert entry.params and all(isinstance(p, Param) for p in entry.params.values())
        assert set(entry.aliases.values()) <= set(entry.params)
        assert callable(cls.from_spec)


@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_declared_defaults_are_the_constructors(name):
    """A parameter's declared type and default are what the drafter's constructor takes."""
    cls = DRAFTERS[name]
    sig = inspect.signature(cls.__init__).parameters
    checked = 0
    for key, p in DRAFTERS.entry(name).params.items():
        if key in sig and sig[key].default is not inspect.Parameter.empty:
            assert p.default == sig[key].default, f"{name}:{key}"
            if p.default is not None:
                assert isinstance(p.default, p.type), f"{name}:{key}"
            checked += 1
    assert checked or name == "hybrid"


def test_none_and_instances():
    assert make_drafter(None, None) is None
    d = NgramDrafter()
    assert make_drafter(d, None) is d


def test_options_override_the_spec():
    d = make_drafter("ngram:num_tokens=8,max_ngram=4", None, num_tokens=3)
    assert (d.num_tokens, d.max_ngram, d.min_ngram) == (3, 4, 1)
    d = make_drafter("ngram", None, prompt_lookup_num_tokens=5, max_matching_ngram_size=2)
    assert (d.num_tokens, d.max_ngram) == (5, 2)


@pytest.mark.parametrize(
    "spec, options, msg",
    [
        (
            "medusa",
            {},
            "unknown drafter 'medusa'; valid: eagle, hybrid, layerskip, model, ngram, pruned",
        ),
        (
            "ngram:depth=3",
            {},
            "unknown parameter 'depth' for ngram; valid: "
            "branches, match, max_ngram, min_ngram, num_tokens, short_num_tokens",
        ),
        ("ngram", {"depth": 3}, "unknown parameter 'depth' for ngram; valid: branches, "),
        ("ngram:num_tokens=many", {}, "ngram: num_tokens must be an integer, got 'many'"),
        ("ngram:num_tokens=0", {}, "ngram: num_tokens must be an integer >= 1, got '0'"),
        ("ngram:match=middle", {}, "ngram: match must be one of first, last, got 'middle'"),
        ("ngram:k=4,num_tokens=5", {}, "sets 'num_tokens' twice"),
        ("ngram:foo", {}, "ngram takes no argument, got 'foo'; parameters go as ngram:KEY=VALUE"),
        ("model", {}, "model needs an argument: model:NAME"),
        ("ngram:num_tokens", {}, "ngram takes no argument"),
        (None, {"num_tokens": 3}, "draft options num_tokens given without a draft method"),
        (NgramDrafter(), {"num_tokens": 3}, "cannot be applied to a Drafter instance"),
        (42, {}, "draft must be None, a method spec string or a Drafter instance, got int"),
    ],
)
def test_errors_are_one_line_and_name_the_problem(spec, options, msg):
    with pytest.raises(VeridraftError) as e:
        make_drafter(spec, None, **options)
    assert msg in str(e.value)
    assert "\n" not in str(e.value)
