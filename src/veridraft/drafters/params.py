"""Checked conversion of drafter parameters.

Values come either as strings from a spec ("ngram:num_tokens=8") or as Python values from
`generate(..., num_tokens=8)`; each converter accepts both and raises a one-line VeridraftError
naming the method, the parameter and what is allowed (veridraft.spec).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..spec import as_bool, as_choice, as_float, as_int, bad_value

# The scalar converters are the spec grammar's (one message style for every registry); the
# layer sets are the drafters' own.
__all__ = ["as_bool", "as_choice", "as_float", "as_int", "as_layers", "format_layers"]


def as_layers(method: str, name: str, value, n_layers: int | None = None) -> frozenset[int]:
    """A layer set: "1-3,5" / "" / "none" / "all" or an iterable of ints."""
    want = 'a layer set such as "2-5,7" (0-based' + (
        f", < {n_layers})" if n_layers is not None else ")"
    )
    out: set[int] = set()
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "-"):
            return frozenset()
        if text == "all":
            if n_layers is None:
                raise bad_value(method, name, value, want)
            return frozenset(range(n_layers))
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            try:
                a = int(lo)
                b = int(hi) if sep else a
            except ValueError:
                raise bad_value(method, name, value, want) from None
            if b < a:
                raise bad_value(method, name, value, want)
            out.update(range(a, b + 1))
    else:
        try:
            items = list(value)
        except TypeError:
            raise bad_value(method, name, value, want) from None
        for x in items:
            if isinstance(x, bool) or int(x) != x:
                raise bad_value(method, name, value, want)
            out.add(int(x))
    if any(i < 0 or (n_layers is not None and i >= n_layers) for i in out):
        raise bad_value(method, name, value, want)
    return frozenset(out)


def format_layers(layers: Iterable[int]) -> str:
    """{1, 2, 3, 5} -> "1-3,5" (the inverse of as_layers)."""
    xs = sorted(set(layers))
    parts: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts) if parts else "none"
