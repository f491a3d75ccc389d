"""Acceptance rules by spec: `strict` (verify.py, lossless, the default) and `loose` (loose.py,
lossy).

Spec grammar, the drafters' own (veridraft.spec): ``RULE[:KEY=VALUE[,KEY=VALUE...]]``, e.g.
``loose:topk=5,lam=0.7,shift=2,anchor=content``. A method spec joins a drafter and a rule with
"+": ``ngram+loose:topk=5`` (`split_method`). A lossy rule is refused where a lossless method is
asked for (`make_rule(..., lossless=True)`).
"""

from __future__ import annotations

from . import loose
from .errors import VeridraftError
from .spec import Entry, Registry, split
from .verify import STRICT, Rule


def _strict(params: dict, tokenizer, vocab_size: int | None) -> Rule:
    return STRICT


def _loose(params: dict, tokenizer, vocab_size: int | None) -> Rule:
    if vocab_size is None:
        vocab_size = len(tokenizer) if tokenizer is not None else 0
    return loose.from_params(params, tokenizer, vocab_size)


# name -> Entry; each target builds its rule from (params, tokenizer, vocab_size)
RULES = Registry(
    "rule",
    {
        "strict": Entry(
            "strict",
            "lossless: accept exactly what plain decoding would emit (the default)",
            target=_strict,
        ),
        "loose": Entry(
            "loose",
            "lossy (LVSpec): strict on content tokens, relaxed on fillers and word order",
            params=loose.PARAMS,
            aliases=loose.ALIASES,
            target=_loose,
        ),
    },
)


def parse_rule(spec: str) -> tuple[str, dict[str, str]]:
    """ "loose:topk=5,lambda=0.7" -> ("loose", {"topk": "5", "lam": "0.7"}): the rule and its
    parameters under their canonical names, checked."""
    entry, params = RULES.resolve(RULES.parse(spec))
    return entry.name, params


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
        entry, params = RULES.resolve(RULES.parse(spec))
        if lossless and entry.target is not _strict:  # before building: no tokenizer needed
            raise _refused(spec)
        rule = entry.target(params, tokenizer, vocab_size)
    elif isinstance(spec, Rule):
        rule = spec
    else:
        raise VeridraftError(
            f"verify must be None, a rule spec ({', '.join(sorted(RULES))}) or a Rule, got "
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
    without a "+strict"/"+loose" part -> (spec, None). Other "+" parts stay in the first string."""
    parts = split(spec)
    at = [i for i, p in enumerate(parts) if i and p.partition(":")[0].strip().lower() in RULES]
    if not at:
        return spec, None
    if len(at) > 1:
        rules = ", ".join(parts[i] for i in at)
        raise VeridraftError(f"method {spec!r} names {len(at)} rules ({rules}); give one")
    return "+".join(parts[: at[0]] + parts[at[0] + 1 :]), parts[at[0]]
