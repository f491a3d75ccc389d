"""Loose verification (lossy), after LVSpec: strict on anchor tokens, relaxed on filler tokens,
with a position-shift tolerance. It accepts some draft tokens that the target would not have
chosen, so the output is no longer plain decoding's: every report calls it lossy, and it is
measured by its agreement with the strict output (bench/fidelity.py).

Greedy chains only. At draft position i, x is the draft token and t the target's argmax:
- x == t: accepted (as strict).
- **anchor** (strict): x or t carries content. `anchor=content` (default): a token is content
  unless it is whitespace, punctuation or a function word ("the", "of", "and", ...); digits are
  always content. `anchor=digits`: only tokens with a digit are anchors. `anchor=all`: every
  token is an anchor (strict verification). A mismatch at an anchor ends the accepted run.
- **filler** (x and t both fillers): x is accepted when it is among the target's top-`topk`
  tokens and p(x) >= (1 - lam) * p(t). `lam` is LVSpec's relaxation ratio λ (0 = strict; the
  paper's default 0.7); how λ enters the rule is our reconstruction, as the paper's code is not
  public.
- **position shift** (PST): a mismatch x (anchor or filler, but never a token with a digit) is
  also accepted when it equals a token the target wanted at an earlier position j of the same
  round, i - j <= `shift`, where a filler was relaxed: the draft said the same words in
  another order ("multiple wooden deck" for "wooden deck and multiple").
The token after the accepted run is the target's argmax there, as in strict verification.

With `lam=0`, `topk=1` or `anchor=all`, and `shift=0`, it decides exactly as strict greedy
verification.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch

from .draft import Draft
from .errors import VeridraftError
from .sampling import SamplingParams
from .spec import Param, as_choice, as_float, as_int

ANCHORS = ("content", "digits", "all")
DEFAULTS = {"topk": 5, "lam": 0.7, "shift": 2, "anchor": "content"}
# the `loose:` spec's parameters (rules.py registers the rule)
PARAMS = {
    "topk": Param(int, DEFAULTS["topk"], "a filler is accepted among the target's top-k"),
    "lam": Param(float, DEFAULTS["lam"], "relaxation: p(x) >= (1 - lam) p(t); 0 is strict"),
    "shift": Param(int, DEFAULTS["shift"], "positions a relaxed token may move"),
    "anchor": Param(str, DEFAULTS["anchor"], "which tokens are verified strictly", ANCHORS),
}
ALIASES = {"lambda": "lam", "window": "shift", "k": "topk"}

# Function words: what a filler token may be besides whitespace and punctuation. Content words
# (nouns, verbs, adjectives, names, numbers) are anchors.
FUNCTION_WORDS = frozenset(
    """a an the and or but nor so yet of to in on at by for with from as into onto upon about
    over under after before between through during without within than then too very just also
    is are was were be been being am do does did done have has had having i you he she it we they
    me him her us them my your his its our their this that these those there here which who whom
    whose what when where why how not no can could will would shall should may might must if
    while because although though since until unless all any each every some such both either
    neither other another more most much many few less least own same one ones s t ll ve re d m
    let lets up down out off again further once only well however thus therefore hence""".split()
)


def is_filler_text(text: str) -> bool:
    """A token's text is a filler: whitespace, punctuation, or a function word (no digit)."""
    s = text.strip()
    if not s:
        return True
    if any(c.isdigit() for c in s):
        return False
    if not any(c.isalnum() for c in s):
        return True
    word = s.strip(".,;:!?\"'()[]{}-").lower()
    return word in FUNCTION_WORDS


def token_classes(tokenizer, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(filler [V] bool, has_digit [V] bool) from each id's text; ids the tokenizer does not
    know (padding rows of the embedding) are anchors."""
    filler = torch.zeros(vocab_size, dtype=torch.bool)
    digit = torch.zeros(vocab_size, dtype=torch.bool)
    n = min(vocab_size, len(tokenizer))
    for i in range(n):
        text = tokenizer.decode([i])
        filler[i] = is_filler_text(text)
        digit[i] = any(c.isdigit() for c in text)
    return filler, digit


# tokenizer -> {vocab size: classes}; weak, so a dropped tokenizer takes its masks with it
_CLASSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def classes_for(tokenizer, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """token_classes, computed once per tokenizer object and vocabulary size (~1 s at 150k)."""
    per = _CLASSES.setdefault(tokenizer, {})
    if vocab_size not in per:
        per[vocab_size] = token_classes(tokenizer, vocab_size)
    return per[vocab_size]


@dataclass
class Loose:
    """The `loose:` rule; `filler` and `digit` are [V] masks over token ids (token_classes)."""

    filler: torch.Tensor
    digit: torch.Tensor
    topk: int = DEFAULTS["topk"]
    lam: float = DEFAULTS["lam"]
    shift: int = DEFAULTS["shift"]
    anchor: str = DEFAULTS["anchor"]
    name: str = "loose"
    lossy: bool = True
    _log_ratio: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.anchor not in ANCHORS:
            raise VeridraftError(f"loose: anchor must be one of {', '.join(ANCHORS)}")
        # p(x) >= (1 - lam) p(t)  <=>  logit(x) - logit(t) >= log(1 - lam)
        self._log_ratio = math.log(1.0 - self.lam) if self.lam < 1.0 else -math.inf
        self.name = (
            f"loose:topk={self.topk},lam={self.lam:g},shift={self.shift},anchor={self.anchor}"
        )

    def _relaxable(self, x: int, t: int) -> bool:
        if self.anchor == "all" or self.topk < 2 or self.lam <= 0.0:
            return False
        if self.anchor == "digits":
            return not (bool(self.digit[x]) or bool(self.digit[t]))
        return bool(self.filler[x]) and bool(self.filler[t])

    def accept(
        self,
        logits: torch.Tensor,
        draft: Draft,
        sampling: SamplingParams,
        generator: torch.Generator | None,
    ) -> tuple[list[int], int, int]:
        """(accepted positions, next token, relaxed count): see the module docstring."""
        if draft.parents is not None:
            raise VeridraftError(
                "loose verification takes chain drafts, not token trees; drop the drafter's "
                "branches= parameter"
            )
        if not sampling.greedy:
            raise VeridraftError(
                "loose verification is defined for greedy decoding; use temperature 0 or "
                "strict verification"
            )
        target = logits.argmax(-1).tolist()
        owed: list[tuple[int, int]] = []  # (position, token the target wanted) where relaxed
        n = relaxed = 0
        for i, x in enumerate(draft.tokens):
            t = target[i]
            if x != t:
                ok = (
                    self.shift > 0
                    and not bool(self.digit[x])
                    and any(w == x and i - j <= self.shift for j, w in owed)
                )
                if not ok and self._relaxable(x, t):
                    row = logits[i]
                    if int((row > row[x]).sum()) < self.topk:  # x is in the top-k
                        ok = float(row[x] - row[t]) >= self._log_ratio
                if not ok:
                    break
                owed.append((i, t))
                relaxed += 1
            n += 1
        return list(range(n)), target[n], relaxed


def from_params(params: dict, tokenizer, vocab_size: int) -> Loose:
    """A Loose rule from spec parameters (strings or values), checked."""
    topk = as_int("loose", "topk", params.get("topk", DEFAULTS["topk"]), 1)
    lam = as_float("loose", "lam", params.get("lam", DEFAULTS["lam"]), 0.0, 1.0)
    shift = as_int("loose", "shift", params.get("shift", DEFAULTS["shift"]), 0, 16)
    anchor = as_choice("loose", "anchor", params.get("anchor", DEFAULTS["anchor"]), ANCHORS)
    if tokenizer is None:
        raise VeridraftError(
            "loose verification needs the model's tokenizer to tell anchors from fillers; "
            "pass a loaded model (veridraft.load)"
        )
    filler, digit = classes_for(tokenizer, vocab_size)
    return Loose(filler=filler, digit=digit, topk=topk, lam=lam, shift=shift, anchor=anchor)
