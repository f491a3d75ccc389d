"""The precision comparison line of `python -m veridraft.profile` (veridraft/profile.py)."""

from __future__ import annotations

import pytest
from drafting_helpers import tiny_llama

from veridraft.profile import accounting_line, precision_advice, step_accounting

# shaped like the AMD EPYC figures of smollm2-135m (docs/performance/amd-epyc-zen5.md)
PLAIN = {"fp32": 15.4, "fp16w": 52.2, "bf16": 30.3}
COST = {
    "fp32": {1: 71.6, 4: 107.1},
    "fp16w": {1: 21.7, 4: 34.0},
    "bf16": {1: 28.6, 4: 33.1},
}


def test_names_the_fastest_and_the_flattest_mode_and_says_they_differ():
    line = precision_advice(PLAIN, COST)
    assert line.startswith("On this machine fp16w decodes fastest (tok/s: fp16w 52.2, bf16 30.3")
    assert "costs least, relative to one, in bf16 (bf16 1.16x, fp32 1.50x, fp16w 1.57x)" in line
    assert "Drafters gain the larger ratio in bf16" in line


def test_one_mode_best_at_both_needs_no_caveat():
    cost = {**COST, "fp16w": {1: 21.7, 4: 23.0}}
    line = precision_advice(PLAIN, cost)
    assert "in fp16w (fp16w 1.06x" in line
    assert "Drafters" not in line


def test_another_verification_size():
    cost = {p: {**c, 8: c[4] * 2} for p, c in COST.items()}
    assert "a forward over 8 tokens" in precision_advice(PLAIN, cost, t=8)


def test_step_accounting_counts_the_matmuls_and_the_bound(tmp_path):
    net = tiny_llama(tmp_path)
    acc = step_accounting(net, context=20, steps=3, bandwidth=10e9)
    assert acc["aten_ops"] > 10 and acc["ms"] > 0
    # a tiny model's step is almost all dispatch: its 32-wide matmuls are a small share
    assert 0.3 < acc["outside_matmuls"] < 1.0
    assert acc["bound_ms"] == pytest.approx(acc["bytes"] / 10e9 * 1e3)
    assert acc["share_of_bound"] == pytest.approx(acc["bound_ms"] / acc["ms"])
    assert "ATen calls" in accounting_line(acc, 20)
