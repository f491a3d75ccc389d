"""The fused forward (models/fused.py, models/fused.cpp): bitwise the Python path it stands in
for, at every T and for chains, token trees, sparse views, sub-layer skips and a drafter's own
head; its elementwise steps close to torch's; a switch that turns it off; one build per machine.

The hermetic tests run the tiny q4 Llama of test_q4.py; the real ones the catalog models in q4
(tests/models/test_precision.py runs the row-invariance and exact-match tests on both paths).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_q4 import VOCAB, _tiny

from veridraft.decode import decode
from veridraft.models import fused, kernels
from veridraft.models.base import Capture, Skip, apply_rope
from veridraft.models.q4 import apply_q4
from veridraft.sampling import SamplingParams
from veridraft.tree import tree_attn

pytestmark = pytest.mark.skipif(
    kernels.isa() != "avx512bf16", reason="the fused forward needs AVX512-BF16"
)


@pytest.fixture
def ext(monkeypatch):
    """The compiled module; a failed build on a CPU that runs it fails the test."""
    monkeypatch.delenv("VERIDRAFT_FUSED", raising=False)
    monkeypatch.delenv("VERIDRAFT_Q4_KERNEL", raising=False)
    monkeypatch.delenv("VERIDRAFT_ATTN_KERNEL", raising=False)
    module = fused.load()
    assert module is not None, "the fused forward did not build on a CPU with AVX512-BF16"
    return module


def _both(net, fn):
    """fn() on the fused forward (checked to have run), then on the Python path from the same
    state."""
    assert fused.uses_fused(net)
    keep, calls = net.fused, []
    run = keep.run
    keep.run = lambda *a, **k: calls.append(1) or run(*a, **k)
    try:
        a = fn()
    finally:
        del keep.run
    assert calls, "the fused forward did not take this forward"
    net.fused = None
    try:
        b = fn()
    finally:
        net.fused = keep
    return a, b


def test_elementwise_steps_match_torch(ext):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 64, generator=g) * 3
    w = torch.rand(64, generator=g) + 0.5
    want = F.rms_norm(x, (64,), w, 1e-6)
    got = ext.rmsnorm(x, w, 1e-6, 0)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    # grouped: per-head norms with one weight row per head (q/k norms)
    wh = torch.rand(3, 64, generator=g) + 0.5
    want = F.rms_norm(x, (64,), eps=1e-6) * wh
    got = ext.rmsnorm(x.reshape(7, -1), wh.reshape(-1), 1e-6, 64).view(7, 3, 64)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    # RoPE with the signed sin table of base.RopeTables
    ang = torch.rand(7, 1, 64, generator=g) * 6
    cos, sin = ang.cos(), ang.sin()
    sin[..., :32].neg_()
    want = apply_rope(x, cos, sin)
    assert (ext.rope(x, cos, sin) - want).abs().max() <= 1e-6 * want.abs().max()
    # gated activations over [gate | up]
    gu = torch.randn(5, 2 * 200, generator=g) * 4
    gate, up = gu.chunk(2, -1)
    for act, fn in ((0, F.silu), (1, lambda t: F.gelu(t, approximate="tanh"))):
        want = fn(gate) * up
        assert (ext.glu(gu, act) - want).abs().max() <= 2e-6 * want.abs().max(), act


def test_elementwise_rows_do_not_depend_on_the_other_rows(ext):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 96, generator=g)
    w = torch.rand(96, generator=g)
    many = ext.rmsnorm(x, w, 1e-5, 0)
    assert all(torch.equal(ext.rmsnorm(x[i : i + 1], w, 1e-5, 0)[0], many[i]) for i in range(40))
    gu = torch.randn(40, 192, generator=g)
    many = ext.glu(gu, 0)
    assert all(torch.equal(ext.glu(gu[i : i + 1], 0)[0], many[i]) for i in range(40))


@pytest.fixture(params=[False, True], ids=["q4", "q4a8"])
def tiny(request, ext, tmp_path):
    _, model, path = _tiny(tmp_path, {"attn_v": "Q5_0", "ffn_down": "Q8_0"})
    apply_q4(model, path, a8=request.param)
    assert fused.uses_fused(model)
    return model


def _prefilled(net, n: int = 30, seed: int = 0):
    ids = torch.randint(0, VOCAB, (n + 20,), generator=torch.Generator().manual_seed(seed))
    cache = net.new_cache(n + 40)
    with torch.inference_mode():
        net(ids[:n], cache)
    return cache, ids[n:]


def test_fused_forwards_are_bitwise_the_python_path(tiny):
    net = tiny
    cache, new = _prefilled(net)
    start = cache.length

    def forward(t, **kw):
        def fn():
            cache.truncate(start)
            with torch.inference_mode():
                out = net(new[:t], cache, **kw)
            k = [c[:, :, : cache.length].clone() for c in cache.k]
            return out, k

        return fn

    cases = [dict(t=t) for t in (1, 2, 5, 12, 17)]
    parents = [-1, 0, 0, 1, -1, 4]
    cases.append(dict(t=7, tree=tree_attn(parents)))
    cases.append(dict(t=3, view=torch.tensor([0, 3, 7, 20, 29])))
    cases.append(dict(t=2, view=torch.tensor([[1, 5, 9], [2, 6, 28]])[:1]))  # per KV head
    cases.append(dict(t=4, skip=Skip(attn={0}, mlp={1})))
    cases.append(dict(t=3, num_logits=1))
    for case in cases:
        label = {k: v for k, v in case.items() if k != "tree"}
        (a, ka), (b, kb) = _both(net, forward(**case))
        assert torch.equal(a, b), label
        assert all(torch.equal(x, y) for x, y in zip(ka, kb)), label


def test_a_drafters_own_head_gets_the_final_hidden_states(tiny):
    net = tiny
    cache, new = _prefilled(net)
    start = cache.length

    def fn():
        cache.truncate(start)
        cap = Capture(hidden_layers=(-1,))
        with torch.inference_mode():
            out = net(new[:4], cache, capture=cap, num_logits=0)
        return out.shape, cap.hidden[-1]

    (sa, ha), (sb, hb) = _both(net, fn)
    assert sa == sb == (0, VOCAB) and ha.shape == (4, net.config.dim)
    assert torch.equal(ha, hb)


def test_a_trained_heads_middle_layer_features_come_from_the_fused_forward(tiny):
    """The layers an EAGLE-3 head reads (low, middle, high) are captured by the fused forward
    itself, bitwise the Python path's, beside the logits; a tree forward too."""
    net = tiny
    cache, new = _prefilled(net)
    start = cache.length
    layers = tuple(range(net.config.n_layers))

    def fn(tree=None):
        cache.truncate(start)
        cap = Capture(hidden_layers=layers)
        with torch.inference_mode():
            logits = net(new[:6], cache, capture=cap, tree=tree)
        return logits, [cap.hidden[i] for i in layers]

    for tree in (None, tree_attn([-1, 0, 0, 1, 2])):
        (la, ha), (lb, hb) = _both(net, lambda tree=tree: fn(tree))
        assert torch.equal(la, lb)
        assert len(ha) == len(layers) and all(torch.equal(a, b) for a, b in zip(ha, hb))
        # each layer's own output, not the last one's repeated (the fused x is updated in place)
        assert not torch.equal(ha[0], ha[-1])


def test_fused_rows_are_one_row_steps(tiny):
    net = tiny
    cache, new = _prefilled(net)
    with torch.inference_mode():
        steps = torch.cat([net(new[i : i + 1], cache) for i in range(17)])
        for t in (2, 3, 8, 17):
            cache.truncate(30)
            assert torch.equal(net(new[:t], cache), steps[:t]), t


def test_greedy_decoding_is_the_same_on_both_paths(tiny):
    """A prefill through Python, then steps in C++: the ids of the Python path throughout."""
    net = tiny
    prompt = torch.randint(0, VOCAB, (90,), generator=torch.Generator().manual_seed(3)).tolist()

    def fn():
        ids, _ = decode(net, prompt, max_new_tokens=20, sampling=SamplingParams(),
                        generator=torch.Generator())  # fmt: skip
        return ids

    a, b = _both(net, fn)
    assert a == b and len(a) == 20


def test_forwards_in_two_threads_at_once_give_each_its_own_answer(tiny):
    """The fused forward lets the GIL go (a server's event loop streams while a step
    computes), so two threads may be inside it at once on one model: each call keeps to its
    own buffers and cache, and every thread gets the ids it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    net = tiny
    prompts = [
        torch.randint(0, VOCAB, (40 + 9 * i,), generator=torch.Generator().manual_seed(i)).tolist()
        for i in range(4)
    ]

    def run(prompt):
        ids, _ = decode(net, prompt, max_new_tokens=24, sampling=SamplingParams(),
                        generator=torch.Generator())  # fmt: skip
        return ids

    alone = [run(p) for p in prompts]
    assert len({tuple(a) for a in alone}) == 4  # four different answers to mix up
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(run, prompts)) == alone


def test_the_fused_forward_can_be_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv("VERIDRAFT_FUSED", "0")
    monkeypatch.setattr(fused, "_loaded", {})
    assert fused.load() is None
    _, model, path = _tiny(tmp_path, {})
    apply_q4(model, path)
    assert not fused.uses_fused(model)
    assert model.layers[0].attention_norm.kernel is None  # torch's ops throughout


def test_the_aten_kernel_keeps_the_python_layers(ext, monkeypatch, tmp_path):
    from veridraft.models import q4kernel

    monkeypatch.setattr(q4kernel, "_loaded", {"module": None})  # torch's int4 kernel
    _, model, path = _tiny(tmp_path, {})
    apply_q4(model, path)
    assert not fused.uses_fused(model) and model.layers[0].attention_norm.kernel is None


def test_the_fused_forward_is_built_once_per_machine(ext):
    code = "from veridraft.models import fused; m = fused.load(); print(m is not None)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.startswith("True"), run.stderr[-2000:]
    assert "compiling" not in run.stderr
    folder = kernels.build_dir("fused", fused.SOURCE, kernels.FLAGS, fused.DEPS)
    assert any(folder.glob("*.so"))


def test_a_change_to_an_included_kernel_is_a_new_build(tmp_path):
    a = kernels.build_dir("fused", fused.SOURCE, kernels.FLAGS, fused.DEPS)
    other = tmp_path / "q4kernel.cpp"
    other.write_bytes(fused.DEPS[0].read_bytes() + b"\n// changed\n")
    b = kernels.build_dir("fused", fused.SOURCE, kernels.FLAGS, (other, fused.DEPS[1]))
    assert a != b


# ------------------------------------------------------------------ real models


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_real_models_fused_forwards_are_bitwise_the_python_path(ext, name):
    from veridraft.loader import load

    net = load(name, precision="q4").net
    assert fused.uses_fused(net)
    ids = torch.randint(100, 20000, (80,), generator=torch.Generator().manual_seed(0))
    cache = net.new_cache(120)
    with torch.inference_mode():
        net(ids[:60], cache)

    def forward(t, **kw):
        def fn():
            cache.truncate(60)
            with torch.inference_mode():
                return net(ids[60 : 60 + t], cache, **kw)

        return fn

    n_kv = net.config.n_kv_heads
    view = torch.stack([torch.arange(h, 60, 3)[:12] for h in range(n_kv)])
    for t, kw in (
        (1, {}),
        (9, {}),
        (6, {"tree": tree_attn([-1, 0, 0, 1, 2])}),
        (4, {"view": view}),
        (5, {"skip": Skip(attn={1, 3}, mlp={2})}),
    ):
        a, b = _both(net, forward(t, **kw))
        assert torch.equal(a, b), (name, t, list(kw))
