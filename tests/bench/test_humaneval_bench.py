"""`veridraft bench --suite humaneval` end to end on a tiny random model, with fake problems."""

from __future__ import annotations

import gzip
import json

import pytest
from test_harness_e2e import make_tiny

from veridraft.bench import humaneval, passk
from veridraft.bench.report import rewrite_report
from veridraft.bench.run import BenchConfig, run_bench
from veridraft.errors import VeridraftError


@pytest.fixture
def fake_problems(tmp_path, monkeypatch):
    rows = [
        {
            "task_id": f"HumanEval/{i}",
            "prompt": f"def f{i}(x):\n    '''Return x.'''\n",
            "entry_point": f"f{i}",
            "test": "def check(c):\n    assert c(1) == 1\n",
            "canonical_solution": "    return x\n",
        }
        for i in range(5)
    ]
    path = tmp_path / "HumanEval.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    monkeypatch.setattr(humaneval, "data_path", lambda: path)
    tested = []

    def fake_check(problem, answer, timeout_s=passk.DEFAULT_TIMEOUT_S):
        tested.append(problem.task_id)  # the tiny model writes no code: pass problem 0 only
        return passk.TestResult(problem.number == 0, "passed", "", 0.0)

    monkeypatch.setattr(passk, "check_answer", fake_check)
    return tested


def test_humaneval_suite_reports_pass_at_1_per_method(tmp_path, fake_problems):
    folder = make_tiny(tmp_path / "tiny")
    out = tmp_path / "bench"
    cfg = BenchConfig(
        "ar,ngram",
        suite="humaneval",
        split="even",
        max_new_tokens=12,
        warmup=0,
        out=out,
        threads=1,
        progress=False,
        bandwidth=False,
    )
    res = run_bench(str(folder), cfg, log=lambda s: None)
    assert res["settings"]["question_ids"] == ["HumanEval/0", "HumanEval/2", "HumanEval/4"]
    assert res["settings"]["suite"] == "humaneval" and res["settings"]["split"] == "even"
    # ngram repeats ar's answers (lossless): each distinct answer is tested once
    assert sorted(set(fake_problems)) == ["HumanEval/0", "HumanEval/2", "HumanEval/4"]
    t = res["summary"]["table"]["overall"]
    assert t["ar"]["pass_at_1"] == pytest.approx(1 / 3)
    assert t["ngram"]["pass_at_1"] == t["ar"]["pass_at_1"]
    assert all("passed" in r for r in res["records"])
    assert res["peak_rss_after_load_mb"] > 0
    report = (out / "report.md").read_text()
    assert "pass@1" in report and "(even task ids)" in report and "0.33" in report
    # `veridraft bench report` writes the same report again: pass@1 and fidelity kept
    (out / "report.md").unlink()
    rewrite_report(out / "results.json")
    assert (out / "report.md").read_text() == report


def test_humaneval_suite_refuses_a_questions_file(tmp_path, fake_problems):
    with pytest.raises(VeridraftError, match="exclude each other"):
        run_bench(str(tmp_path), BenchConfig("ar", tmp_path / "q.jsonl", suite="humaneval"))
