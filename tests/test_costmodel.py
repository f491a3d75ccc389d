"""The cost model (veridraft.costmodel): its arithmetic, the file round trip, `explain`, the
ngram default draft length, and `veridraft profile` end to end on a tiny model."""

from __future__ import annotations

import pytest
import torch

import veridraft
from veridraft.cli import main
from veridraft.costmodel import (
    CostModel,
    cost_paths,
    explain,
    load_cost,
    machine_id,
    save_cost,
)
from veridraft.stats import Stats


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _cost(per_token: float, draft: float = 0.0, **kw) -> CostModel:
    """cost(T) = 10 ms * (1 + per_token * (T - 1)) at both contexts."""
    row = {t: 10.0 * (1 + per_token * (t - 1)) for t in (1, 2, 4, 8, 16)}
    return CostModel(
        model=kw.get("model", "m"),
        precision="fp32",
        machine=machine_id(),
        threads=torch.get_num_threads(),
        forward_ms={100: dict(row), 1000: {t: 2 * v for t, v in row.items()}},
        draft_ms={"ngram": draft * 10.0},
    )


def test_speedup_formula_and_best_k():
    flat = _cost(0.0)
    assert flat.speedup(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert flat.best_k(0.9) == 15  # free verification: draft as much as allowed
    assert _cost(1.0).best_k(0.9) == 0  # verification as dear as plain steps: never draft
    mid = _cost(0.1)
    ks = [mid.best_k(a) for a in (0.5, 0.7, 0.9)]
    assert ks == sorted(ks) and ks[0] >= 1  # better acceptance, longer drafts
    assert mid.relative(3) == pytest.approx(1.2)  # interpolated between T=2 and T=4
    assert mid.relative(32) == pytest.approx(2.5 * 2)  # beyond the table: proportional


def test_costs_are_linear_in_the_context_between_and_beyond_the_measured_ones():
    c = _cost(0.1)  # the 1000-position row is twice the 100-position one
    at100, at1000 = c.forward(4, 100), c.forward(4, 1000)
    assert at1000 == pytest.approx(2 * at100)
    assert c.forward(4, 550) == pytest.approx((at100 + at1000) / 2)  # between: linear
    # beyond the longest: along the line through the two longest, per T
    assert c.forward(4, 1900) == pytest.approx(at1000 + (at1000 - at100))
    assert c.forward(4, 50) == at100 and c.forward(4) == at100  # below / none: the shortest
    # where each row's attention grows with the context, a long context makes drafts dearer
    c.forward_ms[1000] = {t: v + 5.0 * t for t, v in c.forward_ms[100].items()}
    assert c.relative(8, 16000) > c.relative(8, 1000) > c.relative(8, 100)
    # a measured figure that falls with the context is never extrapolated downwards
    c.forward_ms[1000] = {t: v / 2 for t, v in c.forward_ms[100].items()}
    assert c.forward(4, 5000) == pytest.approx(c.forward(4, 1000))


def test_profile_contexts_option(capsys):
    from veridraft.cli import _contexts
    from veridraft.errors import VeridraftError

    assert _contexts("1000, 100,8k") == (100, 1000, 8192)
    with pytest.raises(VeridraftError, match="'x' is not a context length"):
        _contexts("100,x")
    with pytest.raises(VeridraftError, match="--contexts is empty"):
        _contexts(" , ")


def test_break_even_alpha():
    mid = _cost(0.1)
    a = mid.break_even_alpha(4)
    assert sum(a**i for i in range(5)) == pytest.approx(1.4, abs=1e-6)  # = cost(5)/cost(1)
    assert mid.break_even_alpha(4, draft_cost=0.1) > a  # a draft that costs needs more
    assert mid.break_even_alpha(8, draft_cost=1.0) is None  # 8 target-sized drafts never pay
    assert _cost(0.0).break_even_alpha(4) == pytest.approx(0.0, abs=1e-9)


def test_file_round_trip(tmp_path):
    c = _cost(0.1, draft=0.01)
    path = c.save(tmp_path / "p.json")
    back = CostModel.read(path)
    assert back == c
    assert back.forward_ms[1000][8] == c.forward_ms[1000][8]


def test_lookup_next_to_the_model_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path / "home"))

    class M:
        name, precision, path = "tiny", "fp16w", tmp_path / "model"

    m = M()
    assert load_cost(m) is None
    m.path.mkdir()
    c = _cost(0.2, model="tiny")
    c.precision = "fp16w"
    assert save_cost(m, c) == cost_paths(m)[0]
    assert load_cost(m) == c
    assert load_cost(m, precision="fp32") is None  # per precision
    cost_paths(m)[0].write_text("{not json")  # a broken file is ignored, never fatal
    assert load_cost(m) is None
    m.path = tmp_path / "missing"  # not writable -> $VERIDRAFT_HOME/profiles
    assert save_cost(m, c).parent == tmp_path / "home" / "profiles"
    assert load_cost(m) == c


def test_explain_names_the_acceptance_this_machine_needs():
    cost = _cost(0.1)
    st = Stats(method="ngram")
    for _ in range(10):
        st.record_round(4, 1)  # alpha 0.25 at k = 4
    lines = explain(st, cost)
    need = cost.break_even_alpha(4)
    assert f"acceptance 0.25 is below the {need:.2f} this machine needs at k=4" in lines[0]
    good = Stats(method="ngram")
    for _ in range(10):
        good.record_round(4, 4)
    assert "predicts x" in explain(good, cost)[0]
    assert explain(Stats(), cost) == [] and explain(st, None) == []


# ------------------------------------------------------------------ tiny model, end to end


@pytest.fixture(scope="module")
def tiny_dir(tiny_smollm2_dir):
    return tiny_smollm2_dir("tiny-llama-cost")


@pytest.mark.filterwarnings("ignore:layerskip")
@pytest.mark.parametrize("precision", ["fp32", "fp16w"])
def test_profile_command_on_a_tiny_model(tiny_dir, precision, capsys):
    argv = ["profile", "--model", str(tiny_dir), "--precision", precision, "--repeats", "1"]
    assert main([*argv, "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "T=32" in out and "break-even" in out
    assert "bounds, ms: bytes read at the copy bandwidth" in out
    for d in ("ngram", "layerskip", "model"):
        assert d in out
    model = veridraft.load(tiny_dir, precision=precision)
    cost = load_cost(model)
    assert cost is not None and cost.precision == precision
    # the long context clipped to the window, less the largest T (32) and one
    assert sorted(cost.forward_ms) == [100, 256 - 33]
    assert sorted(cost.bytes_bound_ms) == sorted(cost.forward_ms) and cost.bandwidth_GBps > 0
    assert cost.compute_bound_ms[100][32] == pytest.approx(32 * cost.compute_bound_ms[100][1])
    assert all(v > 0 for row in cost.forward_ms.values() for v in row.values())
    assert {"ngram", "layerskip", "model"} <= set(cost.draft_ms)
    assert main([*argv, "--show", "--threads", "1"]) == 0
    assert "expected speedup" in capsys.readouterr().out


def test_ngram_default_draft_length_comes_from_the_cost_model(tiny_dir):
    from veridraft.drafters import make_drafter
    from veridraft.drafters.ngram import NGRAM_PRIOR_ALPHA

    model = veridraft.load(tiny_dir, precision="fp32")
    cost = _cost(0.05, model=model.name)
    save_cost(model, cost)
    want = cost.best_k(NGRAM_PRIOR_ALPHA, cost.draft_cost("ngram"))
    assert make_drafter("ngram", model).num_tokens == max(1, want)
    assert make_drafter("ngram:num_tokens=3", model).num_tokens == 3  # the user's choice wins
    cost_paths(model)[0].unlink()
    assert make_drafter("ngram", model).num_tokens == 10  # no profile: the static default


def test_best_nodes_grows_the_tree_while_a_node_pays_for_itself():
    # each node on the accepted path with probability p commits p tokens on average
    probs = [0.9, 0.8, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02]
    assert _cost(0.0).best_nodes(probs) == len(probs)  # flat cost: every node is free
    steep = _cost(0.5)  # each row costs half a one-token forward more
    n = steep.best_nodes(probs)
    mass = [1 + sum(probs[:i]) for i in range(len(probs) + 1)]
    want = max(range(len(probs) + 1), key=lambda i: mass[i] / (1 + 0.5 * i))
    assert n == want and 0 < n < len(probs)
    assert _cost(0.2).best_nodes(probs) > n  # a flatter curve affords a larger tree
    assert steep.best_nodes([0.01, 0.01]) == 0  # nothing pays: no draft
    # a per-node draft cost shrinks the tree
    assert _cost(0.1).best_nodes(probs, node_cost=0.5) < _cost(0.1).best_nodes(probs)
    # measured tree forwards (tree attention) take precedence over chain forwards
    treed = _cost(0.0)
    treed.tree_ms = {100: {t: 10.0 * (1 + 0.5 * (t - 1)) for t in (1, 2, 4, 8, 16)}}
    assert treed.best_nodes(probs) == n
    assert CostModel.from_json(treed.to_json()).tree_ms == treed.tree_ms
