"""models/peak.py: which instruction each precision multiplies with, and its measured peak."""

import pytest
import torch

from veridraft.models import kernels, peak


def test_each_precision_names_its_matmul_instruction():
    zen4, xeon = {"avx512_bf16"}, {"avx512_bf16", "amx_bf16", "amx_int8"}
    assert peak.instruction_for("q4a8", "avx512bf16", zen4) == "vpdpbusd"
    assert peak.instruction_for("q4", "avx512bf16", zen4) == "vdpbf16ps"
    assert peak.instruction_for("bf16", "avx512bf16", zen4) == "vdpbf16ps"
    assert peak.instruction_for("fp32", "avx512bf16", zen4) == "vfmadd231ps"
    assert peak.instruction_for("q4", "avx2", set()) == "vfmadd231ps-ymm"
    # veridraft's own kernels use no AMX tiles; torch's bfloat16 matmuls may, and no vector
    # instruction's peak bounds those
    assert peak.instruction_for("q4a8", "avx512bf16", xeon) == "vpdpbusd"
    assert peak.instruction_for("bf16", "avx512bf16", xeon) is None


def test_an_unknown_instruction_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown instruction 'vaddps'; one of vpdpbusd"):
        peak.peak_gmacs("vaddps")


@pytest.mark.skipif(kernels.isa() is None, reason="neither kernel build runs on this CPU")
def test_the_peak_is_measured_on_this_cpu_and_scales_with_the_instructions_width():
    name = peak.instruction_for("fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = peak.peak_gmacs(name, repeats=2, iters=200_000)
        assert 0 < g < 1e4  # G multiply-adds/s of one core: positive, and not absurd
        if name == "vfmadd231ps" and kernels.isa() == "avx512bf16":
            # vpdpbusd does 4x a float32 FMA's multiply-adds per instruction; at one instruction
            # per cycle either way (or half a cycle on narrower pipes) it cannot peak lower
            assert peak.peak_gmacs("vpdpbusd", repeats=2, iters=200_000) > 1.5 * g
    finally:
        torch.set_num_threads(threads)
