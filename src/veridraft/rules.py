"""Acceptance rules by spec: `strict` (verify.py, lossless, the default) and `loose` (loose.py,
lossy).

Spec grammar, the drafters' own: ``RULE[:KEY=VALUE[,KEY=VALUE...]]``, e.g.
``loose:topk=5,lam=0.7,shift=2,anchor=content``. A method spec joins a drafter and a rule with
"+": ``ngram+loose:topk=5`` (`split_method`). A lossy rule is refused where a lossless method is
asked for (`make_rule(..., lossless=True)`).
"""

from __future__ import annotations

import re

from .errors import VeridraftError
from .verify import STRICT, Rule

RULES = ("strict", "loose")
LOOSE_PARAMS = ("topk", "lam", "shift", "anchor")
_ALIASES = {"lambda": "lam", "window": "shift", "k": "topk"}
_PLUS_RULE = re.compile(r"\+(strict|loose)(:[^+]*)?", re.IGNORECASE)


def as_number(rule: str, name: str, value, lo=None, hi=None, integer: bool = False) -> float:
    want = ("an integer" if integer else "a number") + (f" >= {lo}" if lo is not None else "")
    want += f" and <= {hi}" if hi is not None else ""
    try:
        out = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise VeridraftError(f"{rule}: {name} must be {want}, got {value!r}") from None
    if isinstance(value, bool) or out != out or (integer and out != int(out)):
        raise VeridraftError(f"{rule}: {name} must be {want}, got {value!r}")
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise VeridraftError(f"{rule}: {name} must be {want}, got {value!r}")
    return out


def as_choice(rule: str, name: str, value, choices) -> str:
    v = value.strip().lower() if isinstance(value, str) else value
    if v not in choices:
        raise VeridraftError(f"{rule}: {name} must be one of {', '.join(choices)}, got {value!r}")
    return v


def parse_rule(spec: str) -> tuple[str, dict[str, str]]:
    """ "loose:topk=5,lam=0.7" -> ("loose", {"topk": "5", "lam": "0.7"})."""
    if not isinstance(spec, str) or not spec.strip():
        raise VeridraftError(f"empty verification rule; valid: {', '.join(RULES)}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in RULES:
        raise VeridraftError(
            f"unknown verification rule {name!r} in {spec!r}; valid: {', '.join(RULES)}"
        )
    params: dict[str, str] = {}
    for piece in (p for p in re.split(r"[,;]", rest) if p.strip()):
        key, eq, value = piece.partition("=")
        key = _ALIASES.get(key.strip().lower(), key.strip().lower())
        if not eq or not key:
            raise VeridraftError(f"verification rule {spec!r}: expected KEY=VALUE, got {piece!r}")
        if key in params:
            raise VeridraftError(f"verification rule {spec!r} sets {key!r} twice")
        params[key] = value.strip()
    return name, params


def make_rule(
    spec: str | Rule | None,
    tokenizer=None,
    vocab_size: int | None = None,
    *,
    lossless: bool = False,
) -> Rule:
    """None or "strict" -> the strict rules; "loose:..." -> a Loose rule for this tokenizer;
    a Rule instance -> itself. lossless=True refuses a lossy rule with a one-line error."""
    if spec is None:
        rule: Rule = STRICT
    elif isinstance(spec, str):
        name, params = parse_rule(spec)
        if name == "strict":
            if params:
                raise VeridraftError(f"strict verification takes no parameters, got {spec!r}")
            rule = STRICT
        else:
            bad = [k for k in params if k not in LOOSE_PARAMS]
            if bad:
                raise VeridraftError(
                    f"loose: unknown parameter {bad[0]!r} in {spec!r}; valid: "
                    f"{', '.join(LOOSE_PARAMS)}"
                )
            if lossless:
                raise _refused(spec)
            from .loose import from_params

            if vocab_size is None:
                vocab_size = len(tokenizer) if tokenizer is not None else 0
            rule = from_params(params, tokenizer, vocab_size)
    elif isinstance(spec, Rule):
        rule = spec
    else:
        raise VeridraftError(
            f"verify must be None, a rule spec ({', '.join(RULES)}) or a Rule, got "
            f"{type(spec).__name__}"
        )
    if lossless and rule.lossy:
        raise _refused(rule.name)
    return rule


def _refused(what: str) -> VeridraftError:
    return VeridraftError(
        f"{what} is lossy (it accepts tokens the model would not have chosen) and a lossless "
        "method was asked for; drop the loose rule or the lossless request"
    )


def split_method(spec: str) -> tuple[str, str | None]:
    """ "ngram:num_tokens=8+loose:topk=5" -> ("ngram:num_tokens=8", "loose:topk=5"); a spec
    without "+strict"/"+loose" -> (spec, None). Other "+" parts stay in the first string."""
    m = _PLUS_RULE.search(spec)
    if m is None:
        return spec, None
    rest = (spec[: m.start()] + spec[m.end() :]).strip()
    return rest, m.group(0)[1:]
