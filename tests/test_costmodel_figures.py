"""The cost model's draft-step figures are those of the code each drafter runs (its own
`propose`, subset head included), keyed so that `explain` uses a figure only for the drafter it
was measured for, and says when it has none (universal drafting) instead of counting it free."""

import warnings

import pytest
from drafting_helpers import tiny_llama

from veridraft.costmodel import CostModel, explain
from veridraft.drafters import make_drafter
from veridraft.profile import draft_costs
from veridraft.stats import Stats


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-cost"), vocab=64, init_range=0.02)


def test_draft_costs_are_stored_under_each_drafters_cost_key(net):
    ms = draft_costs(net, context=20, repeats=1, warmup=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layerskip = make_drafter("layerskip", net)
    assert ms[layerskip.cost_key] == ms["layerskip"] > 0
    model_keys = [k for k in ms if k.startswith("model:")]
    assert model_keys == [f"model:target-l1:draft_vocab={0}"]
    assert ms[model_keys[0]] == ms["model"] > 0
    assert not any(k.startswith("universal") for k in ms)  # no figure: its draft model's


def _cost(draft_ms: dict) -> CostModel:
    row = {t: 10.0 * (1 + 0.1 * (t - 1)) for t in (1, 2, 4, 8, 16)}
    return CostModel("m", "fp32", "x", 2, {100: row}, draft_ms=draft_ms)


def _stats(method: str, draft_s: float) -> Stats:
    st = Stats(method=method)
    for _ in range(10):
        st.record_round(4, 3)
    st.draft_s = draft_s
    return st


def test_explain_uses_the_figure_of_this_drafter_only():
    key = "layerskip:attn=1;mlp=:draft_vocab=auto"
    cost = _cost({"layerskip": 0.1, key: 50.0})  # this drafter's step: 5 target forwards
    lines = explain(_stats("layerskip", 0.004), cost, key)
    assert "no acceptance rate makes layerskip pay" in lines[0]
    # a layerskip drafter with another skip set has no figure: the measured time is used and said
    lines = explain(_stats("layerskip", 0.004), cost, "layerskip:attn=2;mlp=:draft_vocab=auto")
    assert "no profiled draft-step figure for layerskip" in lines[0]
    assert "0.01 of a target forward" in lines[0]  # 4 ms / 40 drafted / 10 ms


def test_universal_drafting_is_not_counted_free():
    cost = _cost({"ngram": 0.0})
    slow = explain(_stats("universal:smollm2-135m", 2.0), cost)  # 2 s / 40 tokens = 5 forwards
    assert "no profiled draft-step figure for universal:smollm2-135m" in slow[0]
    assert "no acceptance rate makes universal:smollm2-135m pay" in slow[1]
