"""The acceptance rules: greedy exact match, and speculative sampling whose emitted tokens are
distributed exactly as the target's p - checked with chi-square tests that also catch a wrong
residual (negative controls run through the same statistic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from drafting_helpers import ACCEPT_P, REJECT_P, chi2_pvalue

from veridraft.drafters.base import Draft
from veridraft.sampling import SamplingParams, probs, sample
from veridraft.verify import verify, verify_greedy, verify_speculative

N_DRAWS = 10_000


pytestmark = pytest.mark.usefixtures("one_thread")


def random_logits(v: int, rows: int, seed: int, scale: float = 1.5) -> torch.Tensor:
    return torch.randn(rows, v, generator=torch.Generator().manual_seed(seed)) * scale


def emitted(verify_fn, logits, draft_q, sampling, n, seed, point_mass=None):
    """Run verify_fn n times on fresh drafts; return (first token counts, second token counts
    among rounds whose first token was an accepted draft token)."""
    v = logits.shape[-1]
    g = torch.Generator().manual_seed(seed)
    first = np.zeros(v, dtype=np.int64)
    second = np.zeros(v, dtype=np.int64)
    for _ in range(n):
        if point_mass is None:
            toks = [sample(row, g) for row in draft_q]
            d = Draft(tokens=toks, q=draft_q)
        else:
            d = Draft(tokens=list(point_mass), q=None)
        n_acc, nxt = verify_fn(logits, d, sampling, g)
        out = [*d.tokens[:n_acc], nxt]
        first[out[0]] += 1
        if n_acc >= 1:
            second[out[1]] += 1
    return first, second


SETTINGS = {
    "t1": SamplingParams(temperature=1.0),
    "t0.7-topk6": SamplingParams(temperature=0.7, top_k=6),
    "topp0.8": SamplingParams(temperature=1.0, top_p=0.8),
}


# ---------------------------------------------------------------- a deliberately wrong verifier


def verify_wrong_residual(logits, draft, sampling, generator):
    """Like verify_speculative, but on rejection resamples from p instead of norm(max(0, p-q))
    (and, for point masses, from p without removing the rejected token)."""
    k = len(draft.tokens)
    p = probs(logits[: k + 1], sampling)
    u = torch.rand(max(k, 1), generator=generator, dtype=torch.float64).tolist()
    for i, x in enumerate(draft.tokens):
        px = float(p[i, x])
        qx = 1.0 if draft.q is None else float(draft.q[i, x])
        if qx > 0 and u[i] < min(1.0, px / qx):
            continue
        return i, sample(p[i], generator)
    return k, sample(p[k], generator)


# ---------------------------------------------------------------- sampling with q


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("v", [8, 20])
def test_speculative_with_q_emits_p(setting, v):
    sp = SETTINGS[setting]
    logits = random_logits(v, 3, seed=v)
    q = probs(random_logits(v, 2, seed=100 + v), sp)
    p = probs(logits, sp).numpy()
    first, second = emitted(verify_speculative, logits, q, sp, N_DRAWS, seed=1)
    assert chi2_pvalue(first, p[0]) > ACCEPT_P
    # given the first draft token was accepted, the second is p[1] (draft or bonus)
    assert second.sum() > 500
    assert chi2_pvalue(second, p[1]) > ACCEPT_P


def test_wrong_residual_is_caught_with_q():
    """Negative control: the same statistic rejects a verifier whose residual is p."""
    sp = SETTINGS["t1"]
    logits = random_logits(12, 3, seed=5)
    q = probs(random_logits(12, 2, seed=6), sp)
    p = probs(logits, sp).numpy()
    first, _ = emitted(verify_wrong_residual, logits, q, sp, N_DRAWS, seed=1)
    assert chi2_pvalue(first, p[0]) < REJECT_P


def test_q_equal_p_accepts_everything():
    sp = SETTINGS["t1"]
    logits = random_logits(10, 3, seed=7)
    q = probs(logits[:2], sp)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        toks = [sample(row, g) for row in q]
        n_acc, _ = verify_speculative(logits, Draft(toks, q), sp, g)
        assert n_acc == 2


def test_draft_mass_outside_target_support():
    """top-k removes tokens 0 and 4 from p; q puts most of its mass on token 0. Token 0 is never
    accepted, tokens outside p's support are never emitted, and the output is still p."""
    sp = SamplingParams(temperature=1.0, top_k=3)
    logits = torch.tensor([[-5.0, 1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]])
    p = probs(logits, sp).numpy()
    first, _ = emitted(verify_speculative, logits, q, sp, N_DRAWS, seed=3)
    assert first[0] == 0 and first[4] == 0
    assert chi2_pvalue(first, p[0]) > ACCEPT_P


# ---------------------------------------------------------------- point-mass proposals


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("which", ["likely", "unlikely-first", "unlikely-second"])
def test_point_mass_emits_p(setting, which):
    """Point-mass drafts [x0, x1]: the first emitted token is distributed as p[0], and the second
    (in rounds that accepted x0) as p[1], for a likely and an unlikely (maybe p = 0) token at
    each position."""
    sp = SETTINGS[setting]
    v = 12
    logits = random_logits(v, 3, seed=11)
    p = probs(logits, sp).numpy()
    top0, top1 = int(np.argmax(p[0])), int(np.argmax(p[1]))
    x0 = int(np.argmin(p[0])) if which == "unlikely-first" else top0
    x1 = int(np.argmin(p[1])) if which == "unlikely-second" else top1
    first, second = emitted(
        verify_speculative, logits, None, sp, N_DRAWS, seed=2, point_mass=[x0, x1]
    )
    assert chi2_pvalue(first, p[0]) > ACCEPT_P
    # The second token follows exactly the rounds that accepted x0.
    assert second.sum() == first[x0]
    if which == "unlikely-first":
        return  # too few accepted rounds to test p[1]; the other two cases test it
    assert second.sum() > 1000, "x0 is p[0]'s mode: most rounds accept it"
    assert chi2_pvalue(second, p[1]) > ACCEPT_P


def test_wrong_point_mass_residual_is_caught():
    """Negative control: resampling from p without removing the rejected token is biased."""
    sp = SETTINGS["t1"]
    logits = random_logits(12, 2, seed=11)
    p = probs(logits, sp).numpy()
    x0 = int(np.argmax(p[0]))
    first, _ = emitted(verify_wrong_residual, logits, None, sp, N_DRAWS, seed=2, point_mass=[x0])
    assert chi2_pvalue(first, p[0]) < REJECT_P


# ---------------------------------------------------------------- greedy


def _onehot_logits(targets: list[int], v: int = 10) -> torch.Tensor:
    logits = torch.randn(len(targets), v, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(targets):
        logits[i, t] = 10.0
    return logits


def test_greedy_all_accepted_gives_bonus():
    logits = _onehot_logits([3, 5, 7, 1])
    assert verify_greedy(logits, Draft([3, 5, 7])) == (3, 1)


def test_greedy_stops_at_first_mismatch():
    logits = _onehot_logits([3, 5, 7, 1])
    assert verify_greedy(logits, Draft([3, 4, 7])) == (1, 5)
    assert verify_greedy(logits, Draft([9, 5, 7])) == (0, 3)


def test_greedy_empty_draft_is_plain_decoding():
    logits = _onehot_logits([6])
    assert verify_greedy(logits, Draft([])) == (0, 6)


def test_verify_dispatches_on_temperature():
    logits = _onehot_logits([3, 5])
    g = torch.Generator().manual_seed(0)
    assert verify(logits, Draft([3]), SamplingParams(temperature=0.0), g) == (1, 5)
    # greedy ignores q entirely
    q = torch.full((1, 10), 0.1)
    assert verify(logits, Draft([4], q), SamplingParams(), g) == (0, 3)
