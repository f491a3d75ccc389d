"""The text the repository ships (README, docs, package sources and JSON) speaks of the product:
no notes on how it was made ("session 3", "issue 7", "other jobs") and no absolute paths of the
machine a file was written on. Cheap: one regex pass over each file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".md", ".json", ".jsonl", ".py"}
# Question sets are third-party text; their words are not ours.
DATASETS = (ROOT / "src" / "veridraft" / "bench" / "data",)
# Model outputs and questions stored in benchmark results: what a model said, not what we wrote.
QUOTED = re.compile(r'^\s*"(text|turns|output|prompt)":')

PATTERNS = {
    "a work session": re.compile(
        r"\bsessions? ?-?\d"
        r"|\b(this|that|the|both|each|earlier|later|previous|next) sessions?\b(?!-scoped)"
        r"|\bsession (time|allowed|budget)",
        re.IGNORECASE,
    ),
    "an issue number": re.compile(r"\bissues? #?\d", re.IGNORECASE),
    "the machine's other load": re.compile(r"\bother jobs\b", re.IGNORECASE),
    "an absolute path of the machine": re.compile(r"(?<![\w.~$])/(root|work|home|tmp|Users)/"),
    # the repository stands alone: its text never sends a reader to files it does not ship
    "a file outside the repository": re.compile(r"\.\./shared\b|\bDESIGN\.md\b"),
}


def shipped_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for top in ("docs", "src"):
        for p in sorted((ROOT / top).rglob("*")):
            if p.suffix in SUFFIXES and p.is_file() and not any(d in p.parents for d in DATASETS):
                files.append(p)
    return files


def offences(path: Path) -> list[str]:
    label = path.relative_to(ROOT) if ROOT in path.parents else path.name
    found = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if path.suffix in (".json", ".jsonl") and QUOTED.match(line):
            continue
        for what, pattern in PATTERNS.items():
            m = pattern.search(line)
            if m:
                found.append(f"{label}:{n}: {what} ({m.group(0)!r})")
    return found


def test_the_scan_sees_the_files_it_should():
    names = {p.relative_to(ROOT).as_posix() for p in shipped_files()}
    assert "README.md" in names and "src/veridraft/decode.py" in names
    assert any(n.startswith("src/veridraft/profiles/") and n.endswith(".json") for n in names)
    assert not any(n.startswith("src/veridraft/bench/data/") for n in names)


def test_the_patterns_catch_what_they_are_for(tmp_path):
    bad = tmp_path / "notes.md"
    bad.write_text(
        "fine line\nmeasured in Session 4\nsee issue #7\n"
        '"questions_file": "/work/shared/q.jsonl"\nshared with other jobs\n'
        "one pytest session, 96 dog walking sessions, $VERIDRAFT_HOME/models\n"
        "the design is in ../shared/DESIGN.md\n",
        encoding="utf-8",
    )
    got = [o.split(": ", 1)[1] for o in offences(bad)]
    assert [g.split(" (")[0] for g in got] == [
        "a work session",
        "an issue number",
        "an absolute path of the machine",
        "the machine's other load",
        "a file outside the repository",
    ]


def test_shipped_text_speaks_of_the_product():
    found = [o for p in shipped_files() for o in offences(p)]
    assert not found, "repository text that speaks of how it was made:\n" + "\n".join(found)
