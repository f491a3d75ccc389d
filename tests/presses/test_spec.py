"""kv= spec parsing: one clear line per mistake."""

from __future__ import annotations

import pytest

from veridraft.errors import VeridraftError
from veridraft.presses import make_press


def test_specs_parse():
    p = make_press("snapkv:budget=1024")
    assert p.budget == 1024 and p.window == 32 and p.lossy
    assert make_press("adakv:budget=0.25,alpha=0.2").alpha == 0.2
    assert make_press("pyramidkv:budget=0.1:beta=10").beta == 10
    assert make_press("HybridKV:budget=64;tier=bf16").tier == "bf16"
    assert make_press("mm-shiftkv:budget=0.5").spec() == "mm-shiftkv:budget=0.5"


@pytest.mark.parametrize(
    "spec,words",
    [
        ("", "valid: streaming"),
        ("snap:budget=10", "unknown kv press 'snap'"),
        ("snapkv", "needs a budget"),
        ("snapkv:budget=abc", "token count"),
        ("snapkv:budget=1.5", "ratio in (0, 1)"),
        ("snapkv:budget=-3", "positive"),
        ("snapkv:budget=10,foo=1", "unknown parameter 'foo'"),
        ("snapkv:budget=10,budget=20", "twice"),
        ("snapkv:1024", "expected KEY=VALUE"),
        ("snapkv:budget=10,pooling=median", "avg or max"),
        ("hybridkv:budget=10,tier=fp8", "fp32 or bf16"),
        ("adakv:budget=10,alpha=2", "alpha must be"),
    ],
)
def test_bad_specs_fail_in_one_line(spec, words):
    with pytest.raises(VeridraftError) as e:
        make_press(spec)
    msg = str(e.value)
    assert words in msg and "\n" not in msg
