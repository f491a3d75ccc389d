"""The forward plan (models/plan.py): which attention path each kind of forward takes, decided
once per forward, and that the paths chosen for decoding and verification give rows bitwise
equal to one-row forwards (with a control: the batched path does not)."""

from __future__ import annotations

import pytest
import torch
from drafting_helpers import tiny_llama

from veridraft.cache import KVCache
from veridraft.errors import VeridraftError
from veridraft.models import attnkernel
from veridraft.models import base as base_mod
from veridraft.models import plan as plan_mod
from veridraft.models.attention import (
    KERNEL,
    MASKED,
    PROMPT_ROWS,
    ROWS,
    TILED,
    TREE_ROWS,
    Capture,
    make_span,
    make_tree_span,
)
from veridraft.models.plan import Skip, layer_path, plan_forward
from veridraft.models.precision import apply_precision
from veridraft.presses.compact import CompactKVCache
from veridraft.tree import tree_attn

HAS_KERNEL = attnkernel.load() is not None
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="veridraft's decode kernel is not built")
PARENTS = [-1, 0, 1, -1, 3, 0]  # under the root: two branches, one forking


def test_layer_path_table():
    chain, one = make_span(10, 5, None, None), make_span(10, 1, None, None)
    long = make_span(0, 200, None, None)
    view = make_span(10, 5, None, torch.tensor([1, 3, 4]))
    tree = make_tree_span(10, tree_attn(PARENTS), None)
    # decoding and verification: the kernel where it runs, else row-wise in the packed modes
    assert layer_path(1, one, kernel=True) == KERNEL
    assert layer_path(5, chain, kernel=True) == KERNEL
    assert layer_path(5, view, kernel=True) == KERNEL
    assert layer_path(7, tree, kernel=True, tree=True) == KERNEL
    assert layer_path(5, chain, kernel=False, rowwise=True) == ROWS
    assert layer_path(7, tree, kernel=False, tree=True, rowwise=True) == TREE_ROWS
    # fp32 without the kernel: batched (nothing there is row-exact)
    assert layer_path(5, chain, kernel=False) == TILED
    assert layer_path(1, one, kernel=False) == MASKED
    assert layer_path(7, tree, kernel=False, tree=True) == MASKED
    assert layer_path(5, view, kernel=False, rowwise=True) == MASKED
    # prefill: the kernel's prompt rows where it takes prompts, else torch's tiles
    assert layer_path(200, long, kernel=True, prompt_kernel=True) == PROMPT_ROWS
    assert layer_path(200, long, kernel=True, rowwise=True) == TILED
    assert layer_path(200, long, kernel=False, prompt_kernel=True) == TILED
    # a compacted cache: the same row-exact paths, batched for long forwards
    assert layer_path(5, chain, kernel=True, compacted=True) == KERNEL
    assert layer_path(1, one, kernel=False, rowwise=True, compacted=True) == ROWS
    assert layer_path(5, chain, kernel=False, compacted=True) == MASKED
    assert layer_path(200, long, kernel=True, rowwise=True, compacted=True) == MASKED


def _cache(dtype=torch.float32, layers=4, length=10):
    cache = KVCache(layers, 2, 16, 300, dtype)
    cache.advance(length)
    return cache


def test_plan_per_layer_groups_skips_and_windows():
    """Layers of one window share a span (one set of key ranges); skipped layers have none; the
    path is per layer."""
    windows = [None, 4, None, 4]
    plan = plan_forward(_cache(), 10, 5, windows, 16, skip=Skip(attn={2}))
    assert plan.spans[2] is None and plan.paths[2] is None and plan.group_of == [0, 1, -1, 1]
    assert len(plan.groups) == 2 and plan.spans[1] is plan.spans[3] is plan.groups[1]
    assert [s.window for s in plan.groups] == [None, 4]
    want = KERNEL if HAS_KERNEL else TILED
    assert plan.paths == [want, want, None, want]
    # a float16 cache has no decode kernel: row-wise in a packed mode, masked for a view
    v = torch.tensor([0, 2, 5])
    plan = plan_forward(_cache(torch.float16), 10, 5, windows, 16, view={1: v, 3: v}, rowwise=True)
    assert plan.paths == [ROWS, MASKED, ROWS, MASKED]
    assert plan.spans[1] is plan.spans[3] and plan.spans[1].index is not None
    assert len(plan.groups) == 2


@needs_kernel
def test_plan_fused_choice():
    cache, w = _cache(), [None] * 4
    assert plan_forward(cache, 10, 1, w, 16, fused=True).fused
    assert plan_forward(cache, 10, 64, w, 16, fused=True).fused
    assert not plan_forward(cache, 10, 1, w, 16).fused  # the model has no fused forward
    assert not plan_forward(cache, 10, 65, w, 16, fused=True).fused  # a prefill
    head = Capture(hidden_layers=(-1,))
    assert plan_forward(cache, 10, 3, w, 16, capture=head, fused=True).fused
    # a trained head's middle-layer features come back from the fused forward too
    assert plan_forward(
        cache, 10, 3, w, 16, capture=Capture(hidden_layers=(0, 1, -1)), fused=True
    ).fused
    assert not plan_forward(cache, 10, 3, w, 16, capture=Capture(attn_rows=1), fused=True).fused
    assert not plan_forward(_cache(torch.float16), 10, 1, w, 16, fused=True).fused
    assert plan_forward(cache, 10, 1, w, 16, skip=Skip(attn={0, 1, 2, 3}), fused=True).fused


def test_plan_refuses_what_no_path_runs():
    with pytest.raises(VeridraftError, match="tree forward"):
        plan_forward(_cache(), 10, 5, [None] * 4, 16, tree=tree_attn(PARENTS[:5]))
    with pytest.raises(VeridraftError, match="tree forward"):
        plan_forward(
            _cache(), 10, 7, [None] * 4, 16, tree=tree_attn(PARENTS), view=torch.tensor([1])
        )


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    fp32 = tiny_llama(tmp_path_factory.mktemp("plan"), seed=3, positions=256)
    packed = tiny_llama(tmp_path_factory.mktemp("plan16"), seed=3, positions=256)
    return fp32, apply_precision(packed, "fp16w")


def _spy(monkeypatch):
    real, seen = base_mod.plan_forward, []

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr(base_mod, "plan_forward", spy)
    return seen


def test_each_kind_of_forward_takes_its_path(nets, monkeypatch):
    fp32, fp16w = nets
    seen = _spy(monkeypatch)
    prompt = torch.arange(150) % 16
    for net, rowwise in ((fp32, False), (fp16w, True)):
        seen.clear()
        cache = net.new_cache(200)
        net(prompt, cache)  # prefill
        net(prompt[:1], cache)  # decode
        net(prompt[:5], cache)  # verification
        net(prompt[:6], cache, tree=tree_attn(PARENTS[:5]))  # a token tree
        cache.truncate(151)
        net(prompt[:5], cache, view=torch.tensor([0, 7, 100]))  # a sparse view
        net(prompt[:5], cache, skip=Skip(attn={1}))
        kinds = [p.paths for p in seen]
        short = KERNEL if HAS_KERNEL else (ROWS if rowwise else TILED)
        dtype = net.cache_dtype
        prefill = PROMPT_ROWS if HAS_KERNEL and attnkernel.for_prompts(dtype) else TILED
        assert kinds[0] == [prefill] * 4
        assert kinds[1] == [KERNEL if HAS_KERNEL else MASKED] * 4
        assert kinds[2] == [short] * 4
        tree = KERNEL if HAS_KERNEL else (TREE_ROWS if rowwise else MASKED)
        assert kinds[3] == [tree] * 4
        assert kinds[4] == [KERNEL if HAS_KERNEL else MASKED] * 4
        assert kinds[5] == [short, None, short, short]


def _verify_vs_rows(net, tree=None):
    """A verification forward's logits, and the same rows from one-row forwards (along the
    tree's paths for a tree)."""
    prompt = (torch.arange(40) * 7) % 16
    toks = torch.tensor([3, 9, 1, 4, 12, 0, 7])
    cache = net.new_cache(64)
    with torch.no_grad():
        net(prompt, cache)
        many = net(toks, cache, tree=tree)
        one = []
        rows = tree.rows if tree is not None else [list(range(r + 1)) for r in range(len(toks))]
        for anc in rows:
            cache.truncate(len(prompt))
            for a in anc:
                last = net(toks[a : a + 1], cache)
            one.append(last[0])
    return many, torch.stack(one)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch-rows"])
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_chosen_paths_are_one_row_forwards(nets, monkeypatch, kernel, shape):
    """In a packed mode (row-exact matmuls; fp16w, whose float32 activations carry every
    difference of the attention into the logits) the verification rows are bitwise the one-row
    forwards, through the decode kernel and through torch's row-wise calls alike."""
    if kernel and not HAS_KERNEL:
        pytest.skip("veridraft's decode kernel is not built")
    _, net = nets
    if not kernel:  # as where the kernel is not built: torch's paths on a float32 cache
        monkeypatch.setitem(attnkernel._loaded, "module", None)
        monkeypatch.setattr(net, "cache_dtype", torch.float32)
    seen = _spy(monkeypatch)
    tree = tree_attn(PARENTS) if shape == "tree" else None
    many, one = _verify_vs_rows(net, tree)
    want = KERNEL if kernel else (TREE_ROWS if tree is not None else ROWS)
    assert seen[1].paths == [want] * 4
    assert torch.equal(many, one)


def test_the_check_fails_on_the_batched_path(nets, monkeypatch):
    """Control: had the plan given the verification forward the batched path (one masked call
    for all rows), its rows would not be the one-row forwards'."""
    _, net = nets
    monkeypatch.setitem(attnkernel._loaded, "module", None)  # torch's paths only
    monkeypatch.setattr(net, "cache_dtype", torch.float32)

    real = plan_mod.layer_path

    def batched(t, span, **k):
        return TILED if 1 < t <= 64 and span.causal else real(t, span, **k)

    monkeypatch.setattr(plan_mod, "layer_path", batched)
    many, one = _verify_vs_rows(net)
    assert not torch.equal(many, one)


def test_plan_on_a_compacted_cache():
    """A compacted cache attends over its own layout along the plan's paths; one count of kept
    rows per KV head lets the fused forward take it; views and sliding windows are refused."""
    kept = [[torch.arange(0, 10, 2)] * 2 for _ in range(4)]
    cache = CompactKVCache(_cache(), kept, room=20)
    plan = plan_forward(cache, 10, 3, [None] * 4, 16, rowwise=True, fused=True)
    assert plan.paths == [KERNEL if HAS_KERNEL else ROWS] * 4
    assert plan.fused == HAS_KERNEL and (plan.fused_view is not None) == HAS_KERNEL
    assert (
        plan_forward(cache, 10, 3, [None] * 4, 16).paths == [KERNEL if HAS_KERNEL else MASKED] * 4
    )
    assert plan_forward(cache, 10, 80, [None] * 4, 16, rowwise=True).paths == [MASKED] * 4
    with pytest.raises(VeridraftError, match="compacted KV cache takes no view"):
        plan_forward(cache, 10, 3, [None, 4, None, 4], 16)
    with pytest.raises(VeridraftError, match="compacted KV cache takes no view"):
        plan_forward(cache, 10, 3, [None] * 4, 16, view=torch.tensor([1]))
