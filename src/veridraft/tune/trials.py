"""The trials file: every trial of a search, one JSON line each, next to the profile; running
the same search again resumes from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import VeridraftError

TRIALS_FORMAT = "veridraft-tune-trials/1"


def trials_path_for(out: Path) -> Path:
    """PROFILE.json -> PROFILE.trials.jsonl beside it."""
    stem = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    return out.parent / f"{stem}.trials.jsonl"


def read_trials(path: Path, header: dict) -> list[dict]:
    """Past trials of the same search (same model, precision, prompts and space), or []."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # the last line of an interrupted write
                print(f"tune: ignoring a partial last line in {path}", file=sys.stderr)
                continue
            raise VeridraftError(f"{path}, line {n}: not valid JSON; delete the file") from None
    if not rows or rows[0].get("kind") != "header" or rows[0].get("format") != TRIALS_FORMAT:
        raise VeridraftError(f"{path} is not a veridraft trials file; delete it or pick --out")
    old = rows[0]
    for k in ("model", "precision", "n_layers", "calibration", "search_exit", "max_new_tokens"):
        if old.get(k) != header.get(k):
            raise VeridraftError(
                f"{path} holds trials of another search ({k}: {old.get(k)!r} there, "
                f"{header.get(k)!r} now); delete it or pick another --out"
            )
    return [r for r in rows[1:] if r.get("kind") == "trial"]


def append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


# ------------------------------------------------------------------------ the search


def start_trials(path: Path, header: dict) -> None:
    """A new trials file holding only its header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(header) + "\n", encoding="utf-8")
