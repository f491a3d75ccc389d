"""The multiply-add peak of the vector instruction a precision's matmuls run on, measured on this
CPU: a loop of independent instructions with register operands only (no loads, no dependency
chains), on every current thread. It is the ceiling a kernel's arithmetic can reach; a kernel's
own in-cache rate divided by it is how much of the core its instruction mix leaves to
multiply-adds (the rest: expanding codes, scales, conversions on the same vector pipes).

    vpdpbusd     int8 x uint8 dot products, 64 multiply-adds per 512-bit instruction (q4a8)
    vdpbf16ps    bfloat16 pairs, 32 per 512-bit instruction (q4 and bf16 on AVX512-BF16 CPUs)
    vfmadd231ps  float32, 16 per 512-bit instruction (fp32, fp16w), 8 per 256-bit (AVX2 CPUs)

Figures from 2-core AMD EPYCs: on Zen 4 each of the three 512-bit instructions retires once per
cycle and core, so vpdpbusd peaks at twice vdpbf16ps's multiply-adds and four times
vfmadd231ps's; Zen 5 retires two of each per cycle (vpdpbusd 530 G multiply-adds/s on one
core against Zen 4's 235).
"""

from __future__ import annotations

import time

import torch

from ..home import home
from . import kernels

# name -> (multiply-adds per instruction, vector type, an accumulator's start, a fixed operand,
# the instruction on accumulator a[i] (one of 12 independent ones) and operands x, y, the store)
INSTRUCTIONS = {
    "vpdpbusd": (
        64,
        "__m512i",
        "_mm512_set1_epi32(int(i + t))",
        "_mm512_set1_epi32(0x01020304 + int(t))",
        "_mm512_dpbusd_epi32(a[i], x, y)",
        "_mm512_storeu_si512",
    ),
    "vdpbf16ps": (
        32,
        "__m512",
        "_mm512_set1_ps(float(i + t))",
        "_mm512_castsi512_ps(_mm512_set1_epi32(0x3f803f80 + int(t)))",
        "_mm512_dpbf16_ps(a[i], (__m512bh)x, (__m512bh)y)",
        "_mm512_storeu_ps",
    ),
    "vfmadd231ps": (
        16,
        "__m512",
        "_mm512_set1_ps(float(i + t))",
        "_mm512_set1_ps(1.0f + t)",
        "_mm512_fmadd_ps(x, y, a[i])",
        "_mm512_storeu_ps",
    ),
    "vfmadd231ps-ymm": (
        8,
        "__m256",
        "_mm256_set1_ps(float(i + t))",
        "_mm256_set1_ps(1.0f + t)",
        "_mm256_fmadd_ps(x, y, a[i])",
        "_mm256_storeu_ps",
    ),
}
AVX512_ONLY = ("vpdpbusd", "vdpbf16ps", "vfmadd231ps")


def _source(name: str) -> str:
    _, vec, init, operand, op, store = INSTRUCTIONS[name]
    guard = "__AVX512BF16__" if name in AVX512_ONLY else "__AVX2__"
    return f"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
// {name}: 12 independent accumulators, register operands only: the instruction's throughput
double run(int64_t iters) {{
#if defined({guard})
    std::vector<float> sink(64 * 16);
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t t0, int64_t t1) {{
        for (int64_t t = t0; t < t1; ++t) {{
            {vec} a[12];
            for (int i = 0; i < 12; ++i) a[i] = {init};
            const {vec} x = {operand}, y = {operand};
            for (int64_t n = 0; n < iters; ++n)
                for (int i = 0; i < 12; ++i) a[i] = {op};
            // stored once at the end (an accumulator whose address is taken in the loop would
            // be stored on every round, and the stores would set the pace)
            for (int i = 0; i < 12; ++i) {store}(&sink[(t % 64) * 16], a[i]);
        }}
    }});
    return sink[0];
#else
    return -1.0;  // not in this build
#endif
}}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {{ m.def("run", &run); }}
"""


def instruction_for(
    precision: str, isa: str | None = None, flags: set[str] | None = None
) -> str | None:
    """The instruction a precision's weight matmuls multiply with on this CPU (None: neither
    build of the kernels runs here, or torch's matmuls may run on AMX tiles, which these loops
    do not measure: a vector instruction's peak would be no floor for them)."""
    isa = kernels.isa() if isa is None else isa
    flags = kernels.cpu_flags() if flags is None else flags
    if isa is None:
        return None
    if isa != "avx512bf16":
        return "vfmadd231ps-ymm"
    if precision == "q4a8":  # veridraft's own kernel: vpdpbusd on every AVX512-BF16 CPU
        return "vpdpbusd"
    if precision == "q4":
        return "vdpbf16ps"
    if "amx_bf16" in flags:  # oneDNN's bfloat16 (and float32 by down-conversion) matmuls
        return None
    return "vdpbf16ps" if precision == "bf16" else "vfmadd231ps"


def peak_gmacs(name: str, repeats: int = 5, iters: int = 2_000_000) -> float:
    """`name`'s multiply-adds per second on the current torch threads, / 1e9: the best of
    `repeats` runs of `iters` rounds of 12 instructions per thread, after a warm-up."""
    if name not in INSTRUCTIONS:
        raise ValueError(f"unknown instruction {name!r}; one of {', '.join(INSTRUCTIONS)}")
    macs = INSTRUCTIONS[name][0]
    src = home() / "kernels" / f"bench-peak-{name}.cpp"
    src.parent.mkdir(parents=True, exist_ok=True)
    text = _source(name)
    if not src.is_file() or src.read_text() != text:
        src.write_text(text)
    flags = kernels.AVX2_FLAGS if name not in AVX512_ONLY else kernels.FLAGS
    mod = kernels.build(f"peak{name.replace('-', '')}", src, list(flags), f"a {name} loop")
    if mod.run(max(1, iters // 10)) < 0:
        raise RuntimeError(f"{name} is not in this CPU's build of the kernels")
    timer = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    best = float("inf")
    for _ in range(repeats):
        t = timer()
        mod.run(iters)
        best = min(best, timer() - t)
    return torch.get_num_threads() * iters * 12 * macs / best / 1e9
