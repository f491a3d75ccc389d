"""The pass@1 runner: a correct, a wrong and an endless answer, and the isolation it promises."""

from __future__ import annotations

import time

from veridraft.bench import passk
from veridraft.bench.humaneval import Problem

PROBLEM = Problem(
    task_id="HumanEval/0",
    prompt='from typing import List\n\n\ndef add(xs: List[int]) -> int:\n    """Sum of xs."""\n',
    entry_point="add",
    test="def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n",
    canonical_solution="    return sum(xs)\n",
)


def _answer(code: str) -> str:
    return f"Here is the function:\n\n```python\n{code}```\n\nIt sums the list."


def test_correct_whole_function_passes():
    res = passk.check_answer(PROBLEM, _answer("def add(xs):\n    return sum(xs)\n"))
    assert res.passed and res.status == "passed", res


def test_canonical_body_continues_the_prompt():
    assert passk.check_answer(PROBLEM, PROBLEM.canonical_solution).passed


def test_wrong_answer_fails_with_the_assertion():
    res = passk.check_answer(PROBLEM, _answer("def add(xs):\n    return len(xs)\n"))
    assert not res.passed and res.status == "failed" and "AssertionError" in res.detail


def test_endless_loop_is_killed_at_the_limit_and_fails():
    t0 = time.perf_counter()
    res = passk.check_answer(PROBLEM, _answer("def add(xs):\n    while True:\n        pass\n"), 1.5)
    assert not res.passed and res.status == "timeout"
    assert time.perf_counter() - t0 < 10


def test_no_network_and_no_proxy_settings(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    code = (
        "import os, socket\n"
        "assert not any('proxy' in k.lower() and os.environ[k] != '*' for k in os.environ)\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 9))\n"
        "except OSError as e:\n"
        "    assert 'disabled' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('network reachable')\n"
    )
    res = passk.run_program(code, 5)
    assert res.passed, res


def test_runs_in_a_fresh_directory_removed_afterwards():
    res = passk.run_program("import os\nprint(os.getcwd())\nopen('junk.txt', 'w').write('x')\n", 5)
    assert res.passed
    code = "import os\nassert os.path.basename(os.getcwd()).startswith('veridraft-passk-')\n"
    assert passk.run_program(code, 5).passed


def test_score_records_and_pass_at_1_test_equal_answers_once(monkeypatch):
    calls = []
    real = passk.check_answer

    def counting(problem, answer, timeout_s=passk.DEFAULT_TIMEOUT_S):
        calls.append(answer)
        return real(problem, answer, timeout_s)

    monkeypatch.setattr(passk, "check_answer", counting)
    good, bad = (
        _answer("def add(xs):\n    return sum(xs)\n"),
        _answer("def add(xs):\n    return 0\n"),
    )
    recs = [
        {"method": "ar", "question_id": "HumanEval/0", "text": good},
        {"method": "ngram", "question_id": "HumanEval/0", "text": good},
        {"method": "lossy", "question_id": "HumanEval/0", "text": bad},
        {"method": "x", "question_id": "HumanEval/0", "error": "boom"},
    ]
    passk.score_records(recs, {"HumanEval/0": PROBLEM})
    assert len(calls) == 2
    assert [r.get("passed") for r in recs] == [True, True, False, None]
    assert passk.pass_at_1(recs, "ar") == 1.0 and passk.pass_at_1(recs, "lossy") == 0.0
    assert passk.pass_at_1(recs, "x") is None
