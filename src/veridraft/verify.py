"""Acceptance rules: pure functions of (target logits, draft, sampling settings, generator).

Each returns (n_accepted, next_token): how many draft tokens are kept, and the token the target
emits after them (the correction on a rejection, the bonus token when all are accepted).
"""

from __future__ import annotations

import torch

from .draft import Draft
from .sampling import SamplingParams, probs, sample

LOSSLESS_RULES = ("greedy", "speculative")


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
