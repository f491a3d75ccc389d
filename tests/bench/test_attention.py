"""`python -m veridraft.bench.attention` runs every variant and prints a figure for each."""

from __future__ import annotations

import re

from veridraft.bench import attention
from veridraft.models import attnkernel


def test_the_attention_benchmark_prints_every_variant(capsys):
    argv = "--contexts 300 --rows 1,3 --prompts 128 --layers 2 --heads 4,2,16 --repeats 1"
    assert attention.main(argv.split()) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "@300" in line]
    assert [line.split()[0] for line in rows] == ["1", "3"]
    want = ["f32 torch", "bf16 torch"]
    if attnkernel.load() is not None:
        want += ["f32 veridraft", "bf16 veridraft"]
    for line in rows:
        for name in want:
            assert re.search(rf"{name} [0-9.]+ \([0-9.]+ GB/s\)", line), (name, line)
    assert re.search(r"T=128: one \[T, L\] mask \d+, f32 tiled causal \d+, bf16 tiled causal", out)


def test_prompts_0_times_decode_rows_only(capsys):
    argv = "--contexts 300 --rows 1 --prompts 0 --layers 2 --heads 4,2,16 --repeats 1"
    assert attention.main(argv.split()) == 0
    out = capsys.readouterr().out
    assert "@300" in out and "prompt attention" not in out
