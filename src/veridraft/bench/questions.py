"""Spec-Bench question files: reading, validating, task groups and even selection.

Format (one JSON object a line): `question_id` (int or str), `category` (str), `turns` (list of
str; MT-Bench rows have two), optionally `reference`. Any file of this format works, not only the
Spec-Bench one: categories outside Spec-Bench's 13 labels form a task group of their own name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data.spec_bench import group_of, spread
from ..errors import VeridraftError

# Spec-Bench task groups, in report order; `overall` pools every question.
SPEC_BENCH_GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
OVERALL = "overall"


@dataclass
class Question:
    question_id: int | str
    category: str
    turns: list[str]
    reference: object = None
    line: int = 0  # 1-based line in the file
    extra: dict = field(default_factory=dict)

    @property
    def group(self) -> str:
        return group_of(self.category)


def _fail(path, line: int, what: str) -> VeridraftError:
    return VeridraftError(
        f"{path}, line {line}: {what} (expected a Spec-Bench question line: "
        '{"question_id": 81, "category": "writing", "turns": ["..."]})'
    )


def load_questions(path: str | Path) -> list[Question]:
    """Read and validate a Spec-Bench-format JSONL file; blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VeridraftError(f"questions file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VeridraftError(f"cannot read questions file {path}: {e}") from None
    questions: list[Question] = []
    seen: dict[object, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _fail(path, n, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise _fail(path, n, f"a JSON {type(row).__name__}, not an object")
        missing = [k for k in ("question_id", "category", "turns") if k not in row]
        if missing:
            raise _fail(path, n, f"missing field(s) {', '.join(missing)}")
        qid = row["question_id"]
        if isinstance(qid, bool) or not isinstance(qid, int | str) or qid == "":
            raise _fail(path, n, f"question_id must be an integer or a string, got {qid!r}")
        cat = row["category"]
        if not isinstance(cat, str) or not cat.strip():
            raise _fail(path, n, f"category must be a non-empty string, got {cat!r}")
        turns = row["turns"]
        if not isinstance(turns, list) or not turns:
            raise _fail(path, n, f"turns must be a non-empty list of strings, got {turns!r:.80}")
        for i, t in enumerate(turns):
            if not isinstance(t, str) or not t.strip():
                raise _fail(path, n, f"turns[{i}] must be a non-empty string, got {t!r:.80}")
        if qid in seen:
            raise _fail(path, n, f"question_id {qid!r} already used on line {seen[qid]}")
        seen[qid] = n
        extra = {
            k: v
            for k, v in row.items()
            if k not in ("question_id", "category", "turns", "reference")
        }
        questions.append(Question(qid, cat, list(turns), row.get("reference"), line=n, extra=extra))
    if not questions:
        raise VeridraftError(f"{path}: no questions in the file (it is empty)")
    return questions


def groups_in(questions: list[Question]) -> list[str]:
    """Task groups present, Spec-Bench order first, then others in file order."""
    present = []
    for q in questions:
        if q.group not in present:
            present.append(q.group)
    known = [g for g in SPEC_BENCH_GROUPS if g in present]
    return known + [g for g in present if g not in SPEC_BENCH_GROUPS]


def select(
    questions: list[Question], groups: list[str] | None = None, limit: int | None = None
) -> list[Question]:
    """Questions of the given task groups (all if None), at most `limit` per group picked evenly
    across the file; the result keeps file order."""
    available = groups_in(questions)
    if groups:
        groups = [g for g in groups if g != OVERALL] or None
    if groups:
        unknown = [g for g in groups if g not in available]
        if unknown:
            raise VeridraftError(
                f"unknown task group(s) {', '.join(unknown)}; this file has: {', '.join(available)}"
            )
    wanted = set(groups or available)
    if limit is not None and limit < 1:
        raise VeridraftError(f"--limit must be at least 1, got {limit}")
    keep: set[int] = set()
    for g in wanted:
        idx = [i for i, q in enumerate(questions) if q.group == g]
        picks = idx if limit is None else [idx[j] for j in spread(len(idx), limit)]
        keep.update(picks)
    return [q for i, q in enumerate(questions) if i in keep]


def default_questions_path() -> Path:
    """The Spec-Bench question set: the copy shipped in the package
    (`veridraft/bench/data/spec_bench_dev.jsonl`). A data checkout's copy of the same file, found
    from the working directory or the package's repository, is taken first when present."""
    rel = Path("shared") / "data" / "spec_bench_dev.jsonl"
    here = Path(__file__).resolve()
    bases = [Path.cwd(), *Path.cwd().parents[:2], *here.parents[2:6]]
    candidates = []
    for b in bases:
        for c in (b / ".." / rel, b / rel):
            c = c.resolve()
            if c not in candidates:
                candidates.append(c)
    # The copy shipped in the package: the default wherever no data checkout is around.
    candidates.append(here.parent / "data" / "spec_bench_dev.jsonl")
    for c in candidates:
        if c.is_file():
            return c
    raise VeridraftError(
        "no questions file given and the question set shipped in the package "
        f"({candidates[-1]}) is missing; reinstall veridraft or pass --questions FILE"
    )
