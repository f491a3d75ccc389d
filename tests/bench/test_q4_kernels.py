"""`python -m veridraft.bench.q4_kernels` on a real model: both kernels (and q4a8 where the CPU
runs it) measured in one process, the own kernel reading fewer bytes than torch's two-plane int4
layout."""

from __future__ import annotations

import pytest

from veridraft.bench import q4_kernels
from veridraft.models import q4kernel


@pytest.mark.real
def test_both_kernels_are_measured(real_model_dir):
    if not q4kernel.cpu_supported():
        pytest.skip("this CPU has no AVX512-BF16")
    real_model_dir("smollm2-135m")
    before = dict(q4kernel._loaded)
    rows = q4_kernels.measure("smollm2-135m", rounds=1, ts=(1, 2))
    assert q4kernel._loaded == before  # the process's own choice of kernel is left as it was
    a8 = ["veridraft q4a8"] if q4kernel.a8_supported() else []
    assert [r["kernel"] for r in rows] == ["veridraft", "torch-int4", *a8]
    assert all(r["ms"][1] > 0 and r["ms"][2] > 0 for r in rows)
    own, aten = rows[:2]
    assert own["mb"] < aten["mb"]  # float16 scales and signed bytes vs bfloat16 planes
    if a8:
        assert rows[2]["mb"] == own["mb"]  # the same codes, other activations
