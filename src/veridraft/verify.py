"""Acceptance rules: pure functions of (target logits, draft, sampling settings, generator).

Each returns (n_accepted, next_token): how many draft tokens are kept, and the token the target
emits after them (the correction on a rejection, the bonus token when all are accepted).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .draft import Draft
from .sampling import SamplingParams, probs, sample
from .tree import check_parents, children


@runtime_checkable
class Rule(Protocol):
    """An acceptance rule for the decode loop: `accept` decides like `verify_draft` and also
    returns how many accepted tokens differ from what the target would have chosen (always 0
    for a lossless rule). A rule with `lossy = True` changes the output (rules.py)."""

    name: str
    lossy: bool

    def accept(
        self,
        logits: torch.Tensor,
        draft: Draft,
        sampling: SamplingParams,
        generator: torch.Generator | None,
    ) -> tuple[list[int], int, int]: ...


class Strict:
    """The lossless rules below: greedy exact match, speculative sampling, token trees."""

    name = "strict"
    lossy = False

    def accept(self, logits, draft, sampling, generator) -> tuple[list[int], int, int]:
        path, nxt = verify_draft(logits, draft, sampling, generator)
        return path, nxt, 0


STRICT = Strict()


def verify(
    logits: torch.Tensor,
    draft: Draft,
    sampling: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """logits: [k + 1, V] target logits for [last] + draft.tokens."""
    if sampling.greedy:
        return verify_greedy(logits, draft)
    return verify_speculative(logits, draft, sampling, generator)


def verify_greedy(logits: torch.Tensor, draft: Draft) -> tuple[int, int]:
    """Accept while the draft equals the target argmax, then emit the target argmax."""
    target = logits.argmax(-1).tolist()
    n = 0
    for tok, want in zip(draft.tokens, target):
        if tok != want:
            break
        n += 1
    return n, target[n]


def verify_speculative(
    logits: torch.Tensor,
    draft: Draft,
    sampling: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative (rejection) sampling, Leviathan et al. / Chen et al.

    With q: accept x with prob min(1, p(x)/q(x)); on rejection sample norm(max(0, p - q)).
    With q = None (point mass on x): accept with prob p(x); on rejection sample p without x.
    If every token is accepted, the bonus token is sampled from the last row of p.
    """
    k = len(draft.tokens)
    p = probs(logits[: k + 1], sampling)
    if k:
        u = torch.rand(k, generator=generator, dtype=torch.float64).tolist()
    for i, x in enumerate(draft.tokens):
        px = float(p[i, x])
        qx = 1.0 if draft.q is None else float(draft.q[i, x])
        if qx > 0 and u[i] < min(1.0, px / qx):
            continue
        if draft.q is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - draft.q[i].to(p.dtype)).clamp_min(0.0)
        total = float(residual.sum())
        if total <= 0.0:
            # p == q up to rounding: any rejection is measure-zero; fall back to p.
            residual = p[i]
        return i, sample(residual / residual.sum(), generator)
    return k, sample(p[k], generator)


def verify_draft(
    logits: torch.Tensor,
    draft: Draft,
    sampling: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[list[int], int]:
    """(accepted node indices, next token) for a chain or a tree draft. A chain (parents None)
    goes through `verify` unchanged, so its results and random draws are today's."""
    if draft.parents is None:
        n, nxt = verify(logits, draft, sampling, generator)
        return list(range(n)), nxt
    return verify_tree(logits, draft, sampling, generator)


def verify_tree(
    logits: torch.Tensor,
    draft: Draft,
    sampling: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[list[int], int]:
    """Walk a token tree from the root; logits: [1 + n, V], row 0 for the root, row i + 1 for
    node i. Returns the accepted root-to-node path (node indices) and the next token.

    Greedy: at each node take the first child equal to the target's argmax there.
    Sampling (SpecInfer / EAGLE multi-candidate rejection): at each node try the children in
    order against a residual r (initially p): accept x with prob min(1, r(x)/q(x)); on rejection
    r <- norm(max(0, r - q)) (point mass q: r with x removed). When every child is rejected the
    next token is drawn from r; at a leaf, from p. For each sibling this is one speculative
    sampling step whose target is the previous residual, so the emitted token follows p exactly,
    given that the siblings are deterministic (q None) or independent draws from their q rows.
    One uniform is drawn per node up front, as `verify_speculative` does per chain token, so a
    chain-shaped tree consumes the generator and decides exactly as the chain.
    """
    n = len(draft.tokens)
    parents = draft.parents
    check_parents(parents, n)
    kids = children(parents)
    path: list[int] = []
    if sampling.greedy:
        target = logits.argmax(-1).tolist()
        row = 0
        while True:
            nxt = next((c for c in kids[row] if draft.tokens[c] == target[row]), None)
            if nxt is None:
                return path, target[row]
            path.append(nxt)
            row = nxt + 1
    p = probs(logits[: n + 1], sampling)
    u = torch.rand(n, generator=generator, dtype=torch.float64).tolist() if n else []
    row = 0
    while True:
        r = p[row]
        accepted = None
        for c in kids[row]:
            x = draft.tokens[c]
            rx = float(r[x])
            qx = 1.0 if draft.q is None else float(draft.q[c, x])
            if qx > 0 and u[c] < min(1.0, rx / qx):
                accepted = c
                break
            if draft.q is None:
                residual = r.clone()
                residual[x] = 0.0
            else:
                residual = (r - draft.q[c].to(p.dtype)).clamp_min(0.0)
            if float(residual.sum()) <= 0.0:
                # r == q up to rounding: any rejection is measure-zero; fall back to r.
                residual = r
            r = residual / residual.sum()
        if accepted is None:
            return path, sample(r, generator)
        path.append(accepted)
        row = accepted + 1
