"""`python -m veridraft.bench.fused` on a real model: both paths of one loaded q4 model
measured in one process, and the model left on its fused forward."""

from __future__ import annotations

import pytest

from veridraft.bench import fused as bench_fused
from veridraft.models import fused, kernels


@pytest.mark.real
def test_both_paths_are_measured(real_model_dir, monkeypatch):
    if kernels.isa() != "avx512bf16":
        pytest.skip("the fused forward needs AVX512-BF16")
    real_model_dir("smollm2-135m")
    from veridraft import loader

    seen = []
    load = loader.load
    monkeypatch.setattr(loader, "load", lambda *a, **k: seen.append(load(*a, **k)) or seen[-1])
    rows = bench_fused.measure("smollm2-135m", "q4", rounds=1, ts=(1, 2), context=20)
    assert [r["path"] for r in rows] == ["fused", "python"]
    assert all(r["ms"][1] > 0 and r["ms"][2] > 0 and r["mb"] > 50 for r in rows)
    assert fused.uses_fused(seen[0].net)  # switched back on after the Python rounds
