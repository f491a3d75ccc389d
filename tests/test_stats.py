import pytest

from veridraft.stats import Stats


def test_plain_decoding_has_tau_one_and_no_alpha():
    s = Stats()
    for _ in range(10):
        s.record_round(0, 0)
    assert s.tau == 1.0
    assert s.alpha is None
    assert s.acceptance_per_pos == []


def test_tau_counts_bonus_and_alpha_counts_drafts():
    s = Stats(method="x")
    s.record_round(4, 4)  # all accepted: 5 tokens
    s.record_round(4, 1)  # 2 tokens
    s.record_round(2, 0)  # 1 token
    assert s.tau == pytest.approx(8 / 3)
    assert s.alpha == pytest.approx(5 / 10)
    assert s.acceptance_per_pos == pytest.approx([2 / 3, 1 / 3, 1 / 2, 1 / 2])
    d = s.to_dict()
    assert d["tau"] == pytest.approx(8 / 3) and d["drafted"] == 10
    assert "tau 2.67" in s.summary()
