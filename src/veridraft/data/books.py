"""The long-document text: four public-domain Jane Austen novels split into chapters.

`books_path()` gives the gzipped copy shipped in the package (AUSTEN_README.md), unless a data
checkout's plain `austen.jsonl`, found from the working directory or the package's repository, is
around; `read_lines()` reads either form.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from ..errors import VeridraftError

SHIPPED = Path(__file__).resolve().parent / "austen.jsonl.gz"


def books_path() -> Path:
    rel = Path("shared") / "data" / "long" / "austen.jsonl"
    here = Path(__file__).resolve()
    for b in [Path.cwd(), *Path.cwd().parents[:2], *here.parents[2:6]]:
        for c in (b / ".." / rel, b / rel):
            if c.is_file():
                return c.resolve()
    if SHIPPED.is_file():
        return SHIPPED
    raise VeridraftError(
        "the long-document text austen.jsonl was not found (nor the copy shipped in the "
        "package); pass the file explicitly"
    )


def read_lines(path: str | Path) -> list[str]:
    """The lines of a JSONL file, gzipped (.gz) or not."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read().splitlines()
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, EOFError) as e:
        raise VeridraftError(f"cannot read {path}: {e}; pass the austen.jsonl file") from e
