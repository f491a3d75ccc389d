"""The precision comparison line of `python -m veridraft.profile` (veridraft/profile.py)."""

from __future__ import annotations

from veridraft.profile import precision_advice

# shaped like the AMD EPYC figures of smollm2-135m (docs/performance.md)
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
