"""The precision comparison line of `python -m veridraft.profile` (veridraft/profile.py)."""

from __future__ import annotations

import pytest
import torch
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


def test_bounds_are_the_bytes_at_the_bandwidth_and_the_macs_at_the_rate(tmp_path):
    from veridraft.bench.ar_speed import kv_bytes_per_position
    from veridraft.models.precision import weight_nbytes_per_token
    from veridraft.profile import bounds_ms, matmul_macs

    net = tiny_llama(tmp_path)
    macs = matmul_macs(net)
    lins = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert macs == sum(m.weight.numel() for m in lins) > 0
    b = bounds_ms(net, (1, 8), (20, 200), bandwidth=10e9, rate=1e9)
    w, kv = weight_nbytes_per_token(net), kv_bytes_per_position(net)
    assert b[200][8][0] == pytest.approx((w + kv * 208) / 10e9 * 1e3)
    assert b[20][8][1] == pytest.approx(8 * macs / 1e9 * 1e3)
    assert b[20][1][0] < b[200][1][0]  # a longer cache reads more
    assert bounds_ms(net, (1,), (20,), 10e9, None)[20][1][1] is None  # no rate: no bound


def test_matmul_rate_and_a_stable_bandwidth_are_measured(tmp_path, monkeypatch):
    from veridraft.bench import ar_speed
    from veridraft.profile import matmul_rate, stable_bandwidth

    assert matmul_rate(tiny_llama(tmp_path), rows=4, calls=2, repeats=2) > 0
    figures = iter([20e9, 31e9, 25e9])
    monkeypatch.setattr(ar_speed, "copy_bandwidth", lambda mb: next(figures))
    assert stable_bandwidth(rounds=3) == 31e9  # the best round, not the last or the first


def test_the_report_prints_the_bounds_and_reads_profiles_without_them():
    from veridraft.costmodel import CostModel
    from veridraft.profile import report

    row = {1: 10.0, 2: 11.0, 32: 40.0}
    cost = CostModel(
        model="m",
        precision="q4a8",
        machine="x",
        threads=2,
        forward_ms={100: row},
        bytes_bound_ms={100: {1: 9.0, 2: 9.0, 32: 9.5}},
        compute_bound_ms={100: {1: 1.0, 2: 2.0, 32: 32.0}},
        bandwidth_GBps=30.0,
        matmul_GMACs=400.0,
    )
    text = report(cost)
    assert "copy bandwidth (30.0 GB/s" in text and "(400 G/s" in text
    assert "9/1 90%" in text and "10/32 80%" in text  # larger bound over the measured ms
    back = CostModel.from_json(cost.to_json())
    assert back.compute_bound_ms == cost.compute_bound_ms and back.matmul_GMACs == 400.0
    old = cost.to_json()
    for key in ("bytes_bound_ms", "compute_bound_ms", "bandwidth_GBps", "matmul_GMACs"):
        del old[key]
    before = CostModel.from_json(old)  # a profile stored before the bounds were measured
    assert before.bytes_bound_ms == {} and before.forward_ms == cost.forward_ms
    assert "bounds, ms" not in report(before)


def test_the_report_prints_the_instruction_peak_and_the_floor_it_sets():
    from veridraft.costmodel import CostModel
    from veridraft.profile import report

    cost = CostModel(
        model="m",
        precision="q4a8",
        machine="x",
        threads=2,
        forward_ms={100: {1: 10.0, 16: 40.0}},
        bytes_bound_ms={100: {1: 9.0, 16: 9.5}},
        compute_bound_ms={100: {1: 2.0, 16: 32.0}},
        bandwidth_GBps=30.0,
        matmul_GMACs=100.0,
        peak_instruction="vpdpbusd",
        peak_GMACs=400.0,
    )
    text = report(cost)
    assert "vpdpbusd's peak here: 400 G" in text and "reaches 25% of it" in text
    # T=1: the bytes (9 ms) bound it; T=16: 32 ms at the kernel's rate is 8 ms at the peak,
    # under the 9.5 ms of bytes
    floor = next(line for line in text.splitlines() if line.startswith("floor"))
    assert "9 (x0.90)" in floor and "10 (x0.95)" in floor
    cost.compute_bound_ms = {100: {1: 2.0, 16: 80.0}}  # now the arithmetic sets T=16's floor
    floor = next(line for line in report(cost).splitlines() if line.startswith("floor"))
    assert "20 (x2.00)" in floor
    back = CostModel.from_json(cost.to_json())
    assert back.peak_instruction == "vpdpbusd" and back.peak_GMACs == 400.0
    cost.peak_GMACs = 0.0  # not measured (an older profile): no peak lines
    assert "peak here" not in report(cost)
