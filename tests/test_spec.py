"""The one spec grammar (veridraft.spec): parsing, round trips, "+" composition, the registry
shape and its one-line errors that list the valid choices."""

from __future__ import annotations

import pytest

from veridraft.errors import VeridraftError
from veridraft.spec import Entry, Param, Registry, Spec, join, parse, parse_all, split


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ngram", Spec("ngram")),
        (
            "NGram:num_tokens=8,max_ngram=3",
            Spec("ngram", None, {"num_tokens": "8", "max_ngram": "3"}),
        ),
        ("model:NAME:k=4,mode=fixed", Spec("model", "NAME", {"k": "4", "mode": "fixed"})),
        ("model:C:/models/x:k=2", Spec("model", "C:/models/x", {"k": "2"})),
        ("hybrid:model:qwen2.5-coder-0.5b", Spec("hybrid", "model:qwen2.5-coder-0.5b")),
        (
            "hybrid:streaming:budget=513,min_score=2",
            Spec("hybrid", "streaming", {"budget": "513", "min_score": "2"}),
        ),
        (
            "streaming:qwen2.5-coder-0.5b:budget=513",
            Spec("streaming", "qwen2.5-coder-0.5b", {"budget": "513"}),
        ),
        ("loose:topk=5,lam=0.7", Spec("loose", None, {"topk": "5", "lam": "0.7"})),
        # presses have always taken ":" between parameters too
        ("pyramidkv:budget=0.1:beta=10", Spec("pyramidkv", None, {"budget": "0.1", "beta": "10"})),
        ("HybridKV:budget=64;tier=bf16", Spec("hybridkv", None, {"budget": "64", "tier": "bf16"})),
        # a piece without "=" continues the value before it
        ("layerskip:attn=1-3,5,mlp=4-6", Spec("layerskip", None, {"attn": "1-3,5", "mlp": "4-6"})),
        ("layerskip:profile=C:/p/x.toml", Spec("layerskip", None, {"profile": "C:/p/x.toml"})),
        ("layerskip:attn=,mlp=2", Spec("layerskip", None, {"attn": "", "mlp": "2"})),
    ],
)
def test_parse_and_round_trip(text, expected):
    got = parse(text)
    assert got == expected
    assert parse(str(got)) == got


def test_str_is_the_canonical_spelling():
    assert str(parse(" NGram : num_tokens = 8 ; max_ngram=3")) == "ngram:num_tokens=8,max_ngram=3"
    assert str(Spec("model", "NAME", {"k": "4"})) == "model:NAME:k=4"


def test_composition_with_plus():
    text = "ngram:num_tokens=8+loose:topk=5,lam=0.5+kv:snapkv:budget=0.25"
    assert split(text) == ["ngram:num_tokens=8", "loose:topk=5,lam=0.5", "kv:snapkv:budget=0.25"]
    parts = parse_all(text)
    assert [p.name for p in parts] == ["ngram", "loose", "kv"]
    assert parts[2] == Spec("kv", "snapkv", {"budget": "0.25"})
    assert join(parts) == text
    with pytest.raises(VeridraftError, match="empty part around"):
        split("ngram++loose")


@pytest.mark.parametrize(
    "text, msg",
    [
        ("", "empty spec"),
        ("  ", "empty spec"),
        (":x", "has no name before ':'"),
        ("model::k=2", "has an empty argument"),
        ("ngram:k=2,k=3", "sets 'k' twice"),
    ],
)
def test_parse_errors_are_one_line(text, msg):
    with pytest.raises(VeridraftError) as e:
        parse(text)
    assert msg in str(e.value) and "\n" not in str(e.value)


class Toy:
    """A toy entry for the registry tests. It has a second sentence."""

    name = "toy"
    description = "a toy drafter"
    takes_arg = None
    usage = "toy[:NAME]"
    params = {
        "num_tokens": Param(int, 4, "tokens per round"),
        "lam": Param(float, 0.5),
        "hot": Param(bool, True),
        "mode": Param(str, "fast", "speed", ("fast", "slow")),
        "label": Param(str, None),
    }
    aliases = {"k": "num_tokens"}


def _registry() -> Registry:
    return Registry(
        "toy",
        {
            "toy": Toy,
            "needy": Entry("needy", "needs its argument", arg=True, usage="needy:NAME"),
            "bare": Entry("bare", "takes nothing"),
        },
    )


def test_registry_resolves_aliases_options_and_keeps_values():
    reg = _registry()
    entry, params = reg.resolve("toy:x:k=8,mode=SLOW,hot=no", {"lam": 0.25})
    assert entry.target is Toy and entry.description == "a toy drafter"
    # values stay as given: each builder converts them with its own bounds
    assert params == {"num_tokens": "8", "mode": "SLOW", "hot": "no", "lam": 0.25}
    assert reg["toy"] is Toy and sorted(reg) == ["bare", "needy", "toy"]
    assert reg.entry("needy").target is None  # an Entry registered as it is


@pytest.mark.parametrize(
    "text, options, msg",
    [
        ("ngarm", {}, "unknown toy 'ngarm'; valid: bare, needy, toy"),
        ("", {}, "empty toy spec; valid: bare, needy, toy"),
        (
            "toy:depth=3",
            {},
            "unknown parameter 'depth' for toy; valid: hot, label, lam, mode, num_tokens",
        ),
        ("toy", {"depth": 3}, "unknown parameter 'depth' for toy; valid: hot, "),
        ("toy:k=1,num_tokens=2", {}, "sets 'num_tokens' twice"),
        ("needy", {}, "needy needs an argument: needy:NAME"),
        (
            "bare:x",
            {},
            "bare takes no argument, got 'x'; parameters go as bare:KEY=VALUE,... (valid: none)",
        ),
        # a value that cannot be read as its type
        ("toy:num_tokens=many", {}, "toy: num_tokens must be an integer, got 'many'"),
        ("toy:num_tokens=2.5", {}, "toy: num_tokens must be an integer, got '2.5'"),
        ("toy:lam=half", {}, "toy: lam must be a number, got 'half'"),
        ("toy:hot=maybe", {}, "toy: hot must be true or false, got 'maybe'"),
        ("toy:mode=medium", {}, "toy: mode must be one of fast, slow, got 'medium'"),
        ("toy", {"k": "x"}, "toy: num_tokens must be an integer, got 'x'"),
    ],
)
def test_registry_errors_are_one_line_and_list_the_valid_choices(text, options, msg):
    with pytest.raises(VeridraftError) as e:
        _registry().resolve(text, options)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_options_override_the_spec_and_python_values_go_to_the_builder():
    _, params = _registry().resolve("toy:num_tokens=8,label=a", {"k": 3, "label": None})
    assert params == {"num_tokens": 3, "label": None}


def test_registered_classes_are_described_lazily():
    reg = Registry("toy", {"ngram": "veridraft.drafters.ngram:NgramDrafter"})
    assert isinstance(reg._entries["ngram"], str)  # not imported before it is read
    assert reg.entry("ngram").params["num_tokens"].type is int
    assert reg["ngram"].__name__ == "NgramDrafter"
    reg["other"] = Toy
    assert reg.entry("other").params["num_tokens"] == Param(int, 4, "tokens per round")
    del reg["other"]
    with pytest.raises(VeridraftError, match="unknown toy 'other'; valid: ngram"):
        reg.entry("other")


def test_a_tuple_of_names_reads_a_dataclass_s_fields():
    from dataclasses import dataclass

    @dataclass
    class Press:
        budget: float
        window: int = 32
        pooling: str = "avg"
        name = "press"
        params = ("budget", "window", "pooling", "other")

    e = Registry("kv press", {"press": Press}).entry("press")
    assert e.params == {
        "budget": Param(float, None),
        "window": Param(int, 32),
        "pooling": Param(str, "avg"),
        "other": Param(),
    }
    assert e.description  # its module's first sentence


@pytest.mark.parametrize(
    "fn, value, want",
    [
        ("as_int", "8", 8),
        ("as_int", "8.0", 8),
        ("as_int", 8.0, 8),
        ("as_float", "0.25", 0.25),
        ("as_bool", "Yes", True),
        ("as_bool", "off", False),
        ("as_choice", " Fast ", "fast"),
    ],
)
def test_converters(fn, value, want):
    import veridraft.spec as spec

    args = (("fast", "slow"),) if fn == "as_choice" else ()
    assert getattr(spec, fn)("toy", "x", value, *args) == want


@pytest.mark.parametrize("value", ["8.5", True, "", None, [8], float("inf"), "nan"])
def test_as_int_refuses_what_is_not_an_integer(value):
    from veridraft.spec import as_int

    with pytest.raises(VeridraftError, match="toy: x must be an integer"):
        as_int("toy", "x", value)
