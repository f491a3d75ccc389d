"""Each press keeps exactly its budget (per layer and KV head where it says so), and the
compacted cache holds the full cache's rows bitwise, in less memory."""

from __future__ import annotations

import pytest
import torch
from drafting_helpers import tiny_llama

from veridraft.decode import decode
from veridraft.presses import PRESSES, make_press, prefill_compressed
from veridraft.presses.pyramidkv import layer_budgets
from veridraft.sampling import SamplingParams

N = 90  # prompt length
ROOM = 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    net = tiny_llama(tmp_path_factory.mktemp("press-tiny"), seed=3, layers=4)
    ids = torch.randint(0, 16, (N,), generator=torch.Generator().manual_seed(0)).tolist()
    return net, ids


def _full(net, ids):
    cache = net.new_cache(len(ids))
    net(torch.tensor(ids), cache, num_logits=1)
    return cache


def _check_rows(pre, full):
    c = pre.cache
    for layer, heads in enumerate(c.kept):
        for h, idx in enumerate(heads):
            o = c.off[layer][h]
            assert torch.equal(c.k[layer][o : o + len(idx)], full.k[layer][0, h, idx])
            assert torch.equal(c.v[layer][o : o + len(idx)], full.v[layer][0, h, idx])


@pytest.mark.parametrize("spec", ["budget=24", "budget=0.4"])
@pytest.mark.parametrize(
    "name,extra", [("streaming", ""), ("snapkv", ",window=8"), ("h2o", ""), ("mm-shiftkv", "")]
)
def test_uniform_presses_keep_exactly_the_budget_per_head(tiny, name, extra, spec):
    net, ids = tiny
    b = 24 if spec == "budget=24" else round(0.4 * N)
    pre = prefill_compressed(net, ids, N + ROOM, make_press(f"{name}:{spec}{extra}"))
    for heads in pre.cache.kept:
        for idx in heads:
            assert len(idx) == b
            assert idx.tolist() == sorted(set(idx.tolist())) and 0 <= idx.min() and idx.max() < N


def test_pyramidkv_keeps_its_layer_budgets(tiny):
    net, ids = tiny
    pre = prefill_compressed(net, ids, N + ROOM, make_press("pyramidkv:budget=40,window=8"))
    want = [bl + 8 for bl in layer_budgets(40, 8, N, 4, 20)]
    assert want[0] > want[-1]  # a pyramid
    assert [len(heads[0]) for heads in pre.cache.kept] == want
    assert all(len(set(map(len, heads))) == 1 for heads in pre.cache.kept)


def test_adakv_budgets_differ_per_head_and_sum_exactly(tiny):
    net, ids = tiny
    pre = prefill_compressed(net, ids, N + ROOM, make_press("adakv:budget=30,window=4"))
    sizes = [[len(idx) for idx in heads] for heads in pre.cache.kept]
    assert all(sum(s) == 2 * 30 for s in sizes)
    assert any(len(set(s)) > 1 for s in sizes)  # head-wise, not uniform
    # real savings: the buffers hold each head's own rows (+ room), no padding to the longest
    c = pre.cache
    hd = net.config.head_dim
    assert c.nbytes() == sum(2 * (sum(s) + 2 * ROOM) * hd * 4 for s in sizes)


def test_hybridkv_types_heads_and_splits_the_budget(tiny):
    net, ids = tiny
    press = make_press("hybridkv:budget=32,window=8,chunk=8")
    pre = prefill_compressed(net, ids, N + ROOM, press)
    kinds = {k for heads in press.kinds for k in heads}
    for layer, heads in enumerate(pre.cache.kept):
        assert sum(press.budgets[layer]) == 2 * 32
        for h, idx in enumerate(heads):
            tier = pre.cache.dynamic.get((layer, h))
            if press.kinds[layer][h] == "static":
                assert tier is None and len(idx) == press.budgets[layer][h]
            else:
                assert len(idx) == 0 and tier.n_pick * tier.chunk <= press.budgets[layer][h]
                # the slow tier holds the head's whole prompt, bitwise
                assert torch.equal(tier.k, _full(net, ids).k[layer][0, h, :N])
    # theta = 0 makes every head static, theta = 1 every head dynamic
    for theta, kind in (("0", "static"), ("1", "dynamic")):
        p = make_press(f"hybridkv:budget=32,window=8,chunk=8,theta={theta}")
        prefill_compressed(net, ids, N + ROOM, p)
        assert {k for heads in p.kinds for k in heads} == {kind}
    assert kinds  # typed at all


@pytest.mark.parametrize("name", list(PRESSES))
def test_kept_rows_are_bitwise_the_full_cache_and_stay_so(tiny, name):
    net, ids = tiny
    full = _full(net, ids)
    pre = prefill_compressed(net, ids, N + ROOM, make_press(f"{name}:budget=0.3"))
    _check_rows(pre, full)
    held = pre.cache.nbytes()
    full_bytes = 2 * 4 * 2 * net.config.head_dim * (N + ROOM) * 4
    assert held < full_bytes
    decode(
        net,
        ids,
        max_new_tokens=12,
        sampling=SamplingParams(),
        generator=torch.Generator(),
        prefilled=pre,
    )
    _check_rows(pre, full)  # decoding wrote new rows only


def test_compression_changes_the_output_and_a_full_budget_does_not(tiny):
    """The compacted cache is used (lossy), and keeping everything reproduces the full model."""
    net, ids = tiny

    def run(kv):
        pre = prefill_compressed(net, ids, N + 40, make_press(kv)) if kv else None
        new, _ = decode(
            net,
            ids,
            max_new_tokens=12,
            sampling=SamplingParams(),
            generator=torch.Generator(),
            prefilled=pre,
        )
        return new

    ref = run(None)
    assert run(f"snapkv:budget={N}") == ref
    assert run(f"streaming:budget={N}") == ref
    assert any(run(f"{n}:budget=6") != ref for n in ("streaming", "snapkv", "h2o"))
