"""A draft model loaded on its own runs in the target's precision unless told otherwise: a float32
draft beside a packed target reads 2-4x the bytes per token it needs to."""

import pytest

from veridraft.draft import DraftEnv
from veridraft.drafters import model as model_mod
from veridraft.errors import VeridraftError


class _Target:
    name = "target"

    def __init__(self, precision):
        self.precision = precision


def _env(calls):
    def load(name, precision):
        calls.append((name, precision))
        return object()

    return DraftEnv(load=load, knows=lambda n: n == "draft")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(model_mod, "_LOADED", {})


@pytest.mark.parametrize("target_precision", ["fp32", "bf16", "fp16w"])
def test_default_draft_precision_is_the_targets(target_precision):
    calls = []
    model_mod.resolve_draft_in("model", "draft", _Target(target_precision), None, _env(calls))
    assert calls == [("draft", None if target_precision == "fp32" else target_precision)]


def test_explicit_precision_wins_and_is_validated():
    calls = []
    model_mod.resolve_draft_in("model", "draft", _Target("bf16"), "fp32", _env(calls))
    assert calls == [("draft", None)]
    with pytest.raises(VeridraftError, match="precision"):
        model_mod.resolve_draft_in("model", "draft", _Target("bf16"), "fp8", _env([]))


def test_a_draft_sharing_the_targets_weights_keeps_them():
    target = _Target("bf16")
    got, label = model_mod.resolve_draft_in("model", "target", target, None, _env([]))
    assert got is target and label == "target"
    with pytest.raises(VeridraftError, match="loaded on its own"):
        model_mod.resolve_draft_in("model", "target", target, "fp16w", _env([]))
