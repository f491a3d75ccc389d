"""The press benchmark's report (bench/kv.py): every +kv: row marked lossy, the load average the
run measured in place of a fixed remark."""

from __future__ import annotations

from veridraft.bench.kv import markdown


def result(**extra) -> dict:
    row = {
        "lossy": False,
        "kv_mb": 10.0,
        "kv_ratio": 1.0,
        "decode_tok_s": 20.0,
        "speedup_vs_full_ar": 1.0,
        "speedup_vs_compressed_ar": None,
        "agreement": 1.0,
        "accuracy": 1.0,
        "tau": 1.0,
    }
    pressed = {**row, "lossy": True, "kv_mb": 1.0, "kv_ratio": 10.0, "agreement": 0.5}
    return {
        "command": "python -m veridraft.bench.kv ...",
        "model": "m",
        "precision": "q4a8",
        "context": "16k",
        "task": "single",
        "items": 2,
        "max_new_tokens": 24,
        "cpu": "AMD EPYC",
        "threads": 2,
        "table": {"ar": row, "ar+kv:snapkv:budget=0.1": pressed},
        **extra,
    }


def test_report_gives_the_measured_load_and_marks_presses_lossy():
    md = markdown(result(load_average=[1.2, 1.9, 2.0]))
    assert "load average 1.2-2.0 on" in md
    assert "`ar+kv:snapkv:budget=0.1` (lossy)" in md and "`ar` (lossy)" not in md


def test_an_older_result_keeps_its_note():
    assert "shared machine" in markdown(result(note="shared machine: noisy"))
    assert "load average not recorded" in markdown(result())
