"""Presses in the packed precision modes (bf16, q4, q4a8), where the KV cache is bfloat16 and
every row of a forward must be bitwise a one-row forward's (what keeps speculation exact):

- the compacted cache keeps the cache's element type and plain prefill's rows, bitwise;
- each press keeps exactly its budget;
- a forward over T rows on the compacted cache gives each row bitwise what T one-row forwards
  give, for uniform, per-layer, head-wise and dynamic-head layouts, for chains and token trees,
  on the fused forward and the Python layers, with the decode kernel and without it; controls
  show that a batched attention and a broken causal rule fail the same check;
- speculation (n-gram chains and trees, layer skipping, a draft model) on a compressed target
  gives exactly that target's greedy ids (tiny models; smollm2-135m in q4 at ~1.5k tokens);
- the memory figures count bfloat16 elements as 2 bytes.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager

import pytest
import torch
from drafting_helpers import count_trees, tiny_llama
from packed_helpers import tiny_bf16, tiny_q4

from veridraft.data.books import SHIPPED, read_lines
from veridraft.decode import decode, prefill
from veridraft.drafters import LayerSkipDrafter, ModelDrafter, NgramDrafter
from veridraft.drafters.model import truncate_layers
from veridraft.models import attnkernel, fused, kernels, q4kernel
from veridraft.models.base import Skip
from veridraft.presses import (
    PRESSES,
    full_kv_bytes,
    make_press,
    memory_note,
    prefill_compressed,
)
from veridraft.presses.compact import CompactKVCache
from veridraft.presses.pyramidkv import layer_budgets
from veridraft.sampling import SamplingParams
from veridraft.tree import tree_attn

pytestmark = pytest.mark.usefixtures("one_thread")

N = 120  # prompt length
ROOM = 60
B = 40  # tokens per KV head
MODES = [
    "bf16",
    pytest.param(
        "q4",
        marks=pytest.mark.skipif(
            not q4kernel.cpu_supported(), reason="q4 needs AVX512-BF16 or AVX2 for its kernel"
        ),
    ),
    pytest.param(
        "q4a8",
        marks=pytest.mark.skipif(
            kernels.isa() != "avx512bf16", reason="q4a8 needs AVX512-VNNI and AVX512-BF16"
        ),
    ),
]
# hybridkv's theta that types some heads static and some dynamic on each tiny model (their
# attention concentrations differ); the tests check that both kinds are there
THETA = {"bf16": "0.65", "q4": "0.96", "q4a8": "0.96"}


def spec_of(name: str, mode: str, budget=B) -> str:
    extra = {
        "snapkv": ",window=8",
        "pyramidkv": ",window=8",
        "adakv": ",window=8",
        "hybridkv": f",window=8,chunk=8,theta={THETA[mode]}",
    }
    return f"{name}:budget={budget}{extra.get(name, '')}"


@pytest.fixture(scope="module", params=MODES)
def packed(request, tmp_path_factory):
    mode = request.param
    folder = tmp_path_factory.mktemp(f"press-{mode}")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = tiny_bf16(folder) if mode == "bf16" else tiny_q4(folder, a8=mode == "q4a8")
    finally:
        torch.set_num_threads(n)
    assert net.rowwise_attention
    if attnkernel.load() is not None:  # where the decode kernel runs, the cache is bfloat16
        assert net.cache_dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, net.config.vocab_size, (N,), generator=gen).tolist()
    return mode, net, ids


def _pre(net, ids, spec, room=ROOM):
    return prefill_compressed(net, ids, len(ids) + room, make_press(spec))


def _check_rows(cache: CompactKVCache, full) -> None:
    for layer, heads in enumerate(cache.kept):
        assert cache.k[layer].dtype == full.k[layer].dtype
        for h, idx in enumerate(heads):
            o = cache.off[layer][h]
            assert torch.equal(cache.k[layer][o : o + len(idx)], full.k[layer][0, h, idx])
            assert torch.equal(cache.v[layer][o : o + len(idx)], full.v[layer][0, h, idx])
        for (lay, h), tier in cache.dynamic.items():
            if lay == layer:
                assert tier.k.dtype == full.k[layer].dtype
                assert torch.equal(tier.k, full.k[layer][0, h, : cache.base])
                assert torch.equal(tier.v, full.v[layer][0, h, : cache.base])


@pytest.mark.parametrize("name", list(PRESSES))
def test_kept_rows_are_plain_prefills_rows_bitwise_in_the_cache_type(packed, name):
    mode, net, ids = packed
    with torch.inference_mode():
        full = prefill(net, ids, len(ids)).cache  # plain decoding's prefill
    pre = _pre(net, ids, spec_of(name, mode))
    assert pre.cache.k[0].dtype == net.cache_dtype
    _check_rows(pre.cache, full)
    decode(net, ids, max_new_tokens=8, sampling=SamplingParams(), generator=None, prefilled=pre)
    _check_rows(pre.cache, full)  # decoding wrote new rows only


@pytest.mark.parametrize("name", list(PRESSES))
def test_each_press_keeps_exactly_its_budget(packed, name):
    mode, net, ids = packed
    press = make_press(spec_of(name, mode))
    cache = prefill_compressed(net, ids, N + ROOM, press).cache
    n_kv = net.config.n_kv_heads
    sizes = [[len(idx) for idx in heads] for heads in cache.kept]
    for heads in cache.kept:
        for idx in heads:
            assert idx.tolist() == sorted(set(idx.tolist()))
            assert not len(idx) or 0 <= idx.min() and idx.max() < N
    if name == "pyramidkv":
        want = [b + 8 for b in layer_budgets(B, 8, N, net.config.n_layers, 20)]
        assert want[0] > want[-1] and sizes == [[w] * n_kv for w in want]
    elif name == "adakv":
        assert all(sum(s) == n_kv * B for s in sizes)
        assert any(len(set(s)) > 1 for s in sizes)  # head-wise
    elif name == "hybridkv":
        kinds = {k for heads in press.kinds for k in heads}
        assert kinds == {"static", "dynamic"}, kinds
        for layer, heads in enumerate(cache.kept):
            assert sum(press.budgets[layer]) == n_kv * B
            for h, idx in enumerate(heads):
                tier = cache.dynamic.get((layer, h))
                if press.kinds[layer][h] == "static":
                    assert tier is None and len(idx) == press.budgets[layer][h]
                else:
                    assert len(idx) == 0 and tier.n_pick * tier.chunk <= press.budgets[layer][h]
    else:
        assert sizes == [[B] * n_kv] * net.config.n_layers


def _rows(net, cache, toks, committed=3):
    """Logits of toks[committed:] from one forward after `committed` one-row steps, and from
    one-row forwards only; both from the compressed prompt."""
    with torch.no_grad():
        cache.truncate(cache.base)
        for i in range(committed):
            net(toks[i : i + 1], cache)
        many = net(toks[committed:], cache)
        cache.truncate(cache.base)
        one = torch.cat([net(toks[i : i + 1], cache) for i in range(len(toks))])[committed:]
    return many, one


@contextmanager
def fused_runs(net):
    """A list that counts the fused forward's runs (stays empty where the model has none)."""
    calls: list = []
    if not fused.uses_fused(net):
        yield calls
        return
    inner = net.fused.run
    net.fused.run = lambda *a, **k: calls.append(1) or inner(*a, **k)
    try:
        yield calls
    finally:
        del net.fused.run


LAYOUTS = {  # press -> the layout it makes
    "snapkv": "one kept count for every layer and head",
    "pyramidkv": "one count per layer",
    "adakv": "head-wise counts",
    "hybridkv": "static and dynamic heads (memory-mapped tier)",
    "hybridkv-all-dynamic": "dynamic heads only",
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_forward_over_t_rows_is_bitwise_t_one_row_forwards(packed, layout):
    mode, net, ids = packed
    name = layout.split("-")[0]
    spec = spec_of(name, mode) + (",theta=1" if layout.endswith("dynamic") else "")
    if layout.endswith("dynamic"):
        spec = spec.replace(f",theta={THETA[mode]}", "")
    cache = _pre(net, ids, spec).cache
    assert bool(cache.dynamic) == (name == "hybridkv")
    toks = torch.randint(
        0, net.config.vocab_size, (20,), generator=torch.Generator().manual_seed(1)
    )
    with fused_runs(net) as calls:
        many, one = _rows(net, cache, toks)
    assert torch.equal(many, one), layout
    if fused.uses_fused(net):
        # the fused forward takes the one-count layout; every other one runs the Python layers,
        # and both give the same bits
        assert bool(calls) == (layout == "snapkv"), layout
        keep = net.fused
        net.fused = None
        try:
            assert torch.equal(_rows(net, cache, toks)[0], many)
        finally:
            net.fused = keep


@pytest.mark.parametrize("layout", ["snapkv", "adakv", "hybridkv"])
def test_token_tree_rows_are_bitwise_one_row_forwards_along_their_paths(packed, layout):
    mode, net, ids = packed
    cache = _pre(net, ids, spec_of(layout, mode)).cache
    v = net.config.vocab_size
    parents = [-1, 0, 1, -1, 3, 0]  # nodes under the root: two branches, one forking
    tree = tree_attn(parents)
    # one committed token, then the root and the nodes
    toks = torch.randint(0, v, (2 + len(parents),), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache.truncate(cache.base)
        net(toks[:1], cache)
        many = net(toks[1:], cache, tree=tree)
        for r, anc in enumerate(tree.rows):
            cache.truncate(cache.base + 1)
            for a in anc:  # the path root .. r, one row at a time
                last = net(toks[1 + a : 2 + a], cache)
            assert torch.equal(many[r], last[0]), (layout, r)


def test_the_row_check_can_fail(packed, monkeypatch):
    """Controls: the check above fails for a batched attention over the compacted layout
    (one masked call for all rows, what the cache did before) and for a causal rule that lets
    every row see the whole forward's rows."""
    mode, net, ids = packed
    cache = _pre(net, ids, spec_of("adakv", mode)).cache
    toks = torch.randint(
        0, net.config.vocab_size, (20,), generator=torch.Generator().manual_seed(1)
    )
    keep = net.fused
    net.fused = None
    try:

        def batched(self, q, k, v, step, layer, scale, softcap):
            self.write(layer, step.start, k, v)
            return self._attend_batched(q, step, step.spans[layer], layer, scale, softcap)

        with monkeypatch.context() as m:
            m.setattr(CompactKVCache, "attend", batched)
            many, one = _rows(net, cache, toks)
        assert not torch.equal(many, one)

        row_keys = CompactKVCache._row_keys

        def sees_all(self, step, span):  # every row reads all the forward's rows
            hi, ext, per_row = row_keys(self, step, span)
            full = torch.full_like(hi, int(hi.max()))
            return full, ext, [per_row[-1]] * len(per_row)

        with monkeypatch.context() as m:
            m.setattr(CompactKVCache, "_row_keys", sees_all)
            many, one = _rows(net, cache, toks)
        assert not torch.equal(many, one)
    finally:
        net.fused = keep


def test_without_the_decode_kernel_rows_are_one_row_forwards(tmp_path, monkeypatch):
    """Where veridraft's kernel does not run (VERIDRAFT_ATTN_KERNEL=torch, no AVX512-BF16) the
    cache is float32 and each row is one torch call in a one-row forward's shape."""
    monkeypatch.setitem(attnkernel._loaded, "module", None)
    net = tiny_bf16(tmp_path)
    assert net.cache_dtype == torch.float32 and net.rowwise_attention
    ids = torch.randint(0, 16, (N,), generator=torch.Generator().manual_seed(0)).tolist()
    toks = torch.randint(0, 16, (20,), generator=torch.Generator().manual_seed(1))
    for spec in ("snapkv:budget=40,window=8", "adakv:budget=40,window=8", "hybridkv:budget=40"):
        spec += ",theta=0.65,chunk=8" if spec.startswith("hybridkv") else ""
        cache = _pre(net, ids, spec).cache
        many, one = _rows(net, cache, toks)
        assert torch.equal(many, one), spec


@pytest.mark.parametrize("name", list(PRESSES))
def test_speculation_on_a_compressed_target_is_its_plain_decoding(packed, name):
    mode, net, ids = packed
    spec = spec_of(name, mode, budget=24)
    prompt = ids[:60] + ids[:30] + ids[:30]  # repeats: n-gram drafts find matches
    runs = {}
    drafters = {
        "plain": None,
        "ngram": NgramDrafter(num_tokens=4, max_ngram=2),
        "ngram-tree": NgramDrafter(num_tokens=4, max_ngram=1, branches=3),
        "layerskip": LayerSkipDrafter(Skip(attn={1}, mlp={2}), gamma=0.0, num_tokens=4),
        "model": ModelDrafter(truncate_layers(net, 2), mode="fixed", num_tokens=4),
    }
    tree_counts = count_trees(drafters["ngram-tree"])
    for which, drafter in drafters.items():
        new, stats = decode(
            net,
            prompt,
            max_new_tokens=40,
            sampling=SamplingParams(),
            generator=torch.Generator(),
            drafter=drafter,
            prefilled=_pre(net, prompt, spec),
        )
        runs[which] = new
        if drafter is not None:  # verification forwards of several rows ran
            assert stats.drafted > 0, which
            # and their rows were kept: the drafters that imitate the target get accepted
            assert stats.accepted > 0 or which.startswith("ngram"), which
    assert tree_counts["trees"] > 0
    for which in drafters:
        assert runs[which] == runs["plain"], (name, which)


def _mb(note: str, label: str) -> float:
    return float(re.search(rf"{label} ([0-9.]+) MB", note).group(1))


@pytest.mark.parametrize("name", ["adakv", "hybridkv"])
def test_memory_figures_count_the_cache_element_size(packed, name, tmp_path):
    mode, net, ids = packed
    press = make_press(spec_of(name, mode))
    cache = prefill_compressed(net, ids, N + ROOM, press).cache
    c = net.config
    size = torch.empty(0, dtype=net.cache_dtype).element_size()
    rows = sum(sum(heads) + len(heads) * ROOM for heads in cache.n)
    reps = sum(t.rep.numel() * 4 for t in cache.dynamic.values())  # float32 chunk keys
    assert cache.nbytes() == 2 * rows * c.head_dim * size + reps
    assert cache.tier_bytes() == 2 * len(cache.dynamic) * N * c.head_dim * size
    assert (
        full_kv_bytes(net, N + ROOM)
        == 2 * c.n_layers * c.n_kv_heads * c.head_dim * (N + ROOM) * size
    )
    note = memory_note(cache, net, press)
    assert _mb(note, "held") == round(cache.nbytes() / 2**20, 1)
    assert _mb(note, "vs") == round(full_kv_bytes(net, N + ROOM) / 2**20, 1)
    if attnkernel.load() is not None:
        assert size == 2
    # a float32 model's cache counts 4 bytes an element
    fp32 = tiny_llama(tmp_path, seed=3)
    f = fp32.config
    assert full_kv_bytes(fp32, 10) == 2 * f.n_layers * f.n_kv_heads * f.head_dim * 10 * 4


@pytest.fixture(scope="module")
def smollm2_q4(real_model_dir):
    from veridraft.loader import load

    real_model_dir("smollm2-135m")
    return load("smollm2-135m", precision="q4")


@pytest.mark.slow
def test_speculation_on_a_compressed_real_model_in_q4(smollm2_q4):
    """smollm2-135m in q4 (bfloat16 cache), a ~1.5k-token prompt: n-gram and layer-skip
    speculation on SnapKV (fused forward) and AdaKV (head-wise, Python layers) give exactly
    the compressed target's greedy ids."""
    from veridraft.generate import generate_ids

    m = smollm2_q4
    assert m.net.cache_dtype == torch.bfloat16 or attnkernel.load() is None
    # a fixed text shipped with the package (a README edit must not move this test)
    chapter = json.loads(read_lines(SHIPPED)[0])["chapters"][0]
    text = chapter["text"][:6000]
    ids = m.tokenizer.encode(text + "\n\nIn one sentence, this chapter is about")
    assert 1200 <= len(ids) <= 2000, len(ids)
    for kv in ("snapkv:budget=0.25", "adakv:budget=0.25"):
        outs = {}
        for draft in (None, "ngram", "layerskip"):
            new, stats = generate_ids(m, ids, max_new_tokens=24, draft=draft, kv=kv, warn=False)
            outs[draft] = new
            assert "(lossy)" in stats.method
            if draft is not None:
                assert stats.accepted > 0, (kv, draft)
        assert outs["ngram"] == outs[None] and outs["layerskip"] == outs[None], kv
