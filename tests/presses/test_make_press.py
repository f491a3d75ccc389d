"""kv= spec parsing: one clear line per mistake."""

from __future__ import annotations

import pytest

from veridraft.errors import VeridraftError
from veridraft.presses import PRESSES, make_press
from veridraft.spec import Param


def test_specs_parse():
    p = make_press("snapkv:budget=1024")
    assert p.budget == 1024 and p.window == 32 and p.lossy
    assert make_press("adakv:budget=0.25,alpha=0.2").alpha == 0.2
    assert make_press("pyramidkv:budget=0.1:beta=10").beta == 10
    assert make_press("HybridKV:budget=64;tier=bf16").tier == "bf16"
    assert make_press("mm-shiftkv:budget=0.5").spec() == "mm-shiftkv:budget=0.5"
    assert make_press("snapkv:budget=64,window=16.0").window == 16


def test_the_registry_reads_types_and_defaults_from_the_fields():
    for name in PRESSES:
        entry = PRESSES.entry(name)
        assert entry.target is PRESSES[name] and entry.target.name == name
        assert entry.params["budget"] == Param(float, None)  # required
        assert entry.description and "\n" not in entry.description
    snap = PRESSES.entry("snapkv").params
    assert snap["window"] == Param(int, 32) and snap["pooling"] == Param(str, "avg")
    assert PRESSES.entry("h2o").params["recent"] == Param(float, 0.5)


@pytest.mark.parametrize(
    "spec,words",
    [
        ("", "empty kv press spec; valid: adakv, h2o, hybridkv, mm-shiftkv, pyramidkv, snapkv, "),
        ("snap:budget=10", "unknown kv press 'snap'; valid: adakv, h2o, hybridkv, mm-shiftkv, "),
        ("snapkv", "needs a budget"),
        ("snapkv:budget=abc", "snapkv: budget must be a number, got 'abc'"),
        ("snapkv:budget=1.5", "ratio in (0, 1)"),
        ("snapkv:budget=-3", "positive"),
        (
            "snapkv:budget=10,foo=1",
            "unknown parameter 'foo' for snapkv; valid: budget, kernel, pooling, window",
        ),
        ("snapkv:budget=10,budget=20", "twice"),
        ("snapkv:1024", "snapkv takes no argument, got '1024'; parameters go as snapkv:KEY=VALUE"),
        ("snapkv:budget=10,window=wide", "snapkv: window must be an integer, got 'wide'"),
        ("snapkv:budget=10,window=0", "snapkv: window must be an integer >= 1, got '0'"),
        ("snapkv:budget=10,pooling=median", "avg or max"),
        ("hybridkv:budget=10,tier=fp8", "fp32 or bf16"),
        ("adakv:budget=10,alpha=2", "adakv: alpha must be a number >= 0.0 and <= 1.0, got '2'"),
    ],
)
def test_bad_specs_fail_in_one_line(spec, words):
    with pytest.raises(VeridraftError) as e:
        make_press(spec)
    msg = str(e.value)
    assert words in msg and "\n" not in msg
