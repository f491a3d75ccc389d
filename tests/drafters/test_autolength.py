import pytest

from veridraft.drafters.autolength import AutoLength


def _round(auto: AutoLength, k: int, draft_s: float, verify_s: float, accepted: int) -> None:
    """Feed one round's measurements without sleeping (times are set, not waited for)."""
    auto.drafted(k, draft_s)
    auto._t -= verify_s  # as if verification had taken verify_s
    auto.verified(k, accepted)


def _run(auto: AutoLength, rounds: int, d: float, v1: float, slope: float, alpha: float):
    """Simulate rounds where every proposed token is accepted with frequency alpha."""
    ks = []
    credit = 0.0
    for _ in range(rounds):
        k = auto.choose(16)
        ks.append(k)
        acc = 0
        for _ in range(k):
            credit += alpha
            if credit < 1:
                break
            credit -= 1
            acc += 1
        _round(auto, k, k * d, v1 + k * slope, acc)
    return ks


def test_first_round_measures_plain_verification_then_drafts():
    auto = AutoLength(max_k=6)
    assert auto.choose(16) == 0
    _round(auto, 0, 0.0, 0.010, 0)
    assert auto.v1 == pytest.approx(0.010, rel=0.05)
    assert auto.choose(16) == 6  # no draft cost known yet: try the longest draft
    assert auto.choose(3) == 3  # never more than the loop allows


def test_cheap_accurate_draft_keeps_drafting_long():
    auto = AutoLength(max_k=8)
    ks = _run(auto, 200, d=0.001, v1=0.010, slope=0.0005, alpha=0.95)
    assert sum(k >= 5 for k in ks[-40:]) >= 30
    assert auto.alpha > 0.8


def test_expensive_poor_draft_stops_drafting_and_probes_less_and_less():
    auto = AutoLength(max_k=8, probe_every=8, max_probe_every=64)
    ks = _run(auto, 400, d=0.006, v1=0.010, slope=0.003, alpha=0.3)
    probes = [i for i, k in enumerate(ks) if k > 0 and i > 20]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert max(ks[20:]) <= auto.probe_k  # only probes once drafting has stopped
    assert len(probes) >= 4 and gaps == sorted(gaps) and gaps[-1] >= 64  # backing off
    assert ks[-200:].count(0) >= 195


def test_acceptance_change_is_followed():
    auto = AutoLength(max_k=8)
    _run(auto, 150, d=0.004, v1=0.010, slope=0.002, alpha=0.2)
    assert auto.choose(16) in (0, 1)
    ks = _run(auto, 300, d=0.004, v1=0.010, slope=0.002, alpha=0.97)
    assert max(ks[-50:]) >= 3


def test_expected_rate_matches_the_formula():
    auto = AutoLength(max_k=4, v1=0.01, draft_s=0.005, slope=0.001, acc=1.0, trials=2.0)
    a = 0.5
    assert auto.expected_rate(0) == pytest.approx(100.0)
    assert auto.expected_rate(2) == pytest.approx((1 + a + a * a) / (2 * 0.005 + 0.01 + 0.002))
