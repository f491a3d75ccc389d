"""Checked conversion of drafter parameters.

Values come either as strings from a spec ("ngram:num_tokens=8") or as Python values from
`generate(..., num_tokens=8)`; each converter accepts both and raises a one-line VeridraftError
naming the method, the parameter and what is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import VeridraftError


def _bad(method: str, name: str, value, want: str) -> VeridraftError:
    return VeridraftError(f"{method}: {name} must be {want}, got {value!r}")


def as_int(method: str, name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    want = (
        "an integer"
        + (f" >= {lo}" if lo is not None else "")
        + (f" and <= {hi}" if hi is not None else "")
    )
    if isinstance(value, bool):
        raise _bad(method, name, value, want)
    try:
        out = int(value.strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise _bad(method, name, value, want) from None
    if not isinstance(value, str) and out != value:
        raise _bad(method, name, value, want)
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise _bad(method, name, value, want)
    return out


def as_float(
    method: str, name: str, value, lo: float | None = None, hi: float | None = None
) -> float:
    want = (
        "a number"
        + (f" >= {lo}" if lo is not None else "")
        + (f" and <= {hi}" if hi is not None else "")
    )
    if isinstance(value, bool):
        raise _bad(method, name, value, want)
    try:
        out = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise _bad(method, name, value, want) from None
    if out != out or (lo is not None and out < lo) or (hi is not None and out > hi):
        raise _bad(method, name, value, want)
    return out


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def as_bool(method: str, name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _bad(method, name, value, "true or false")


def as_choice(method: str, name: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    v = value.strip().lower() if isinstance(value, str) else value
    if v not in choices:
        raise _bad(method, name, value, "one of " + ", ".join(choices))
    return v


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
                raise _bad(method, name, value, want)
            return frozenset(range(n_layers))
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            try:
                a = int(lo)
                b = int(hi) if sep else a
            except ValueError:
                raise _bad(method, name, value, want) from None
            if b < a:
                raise _bad(method, name, value, want)
            out.update(range(a, b + 1))
    else:
        try:
            items = list(value)
        except TypeError:
            raise _bad(method, name, value, want) from None
        for x in items:
            if isinstance(x, bool) or int(x) != x:
                raise _bad(method, name, value, want)
            out.add(int(x))
    if any(i < 0 or (n_layers is not None and i >= n_layers) for i in out):
        raise _bad(method, name, value, want)
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
