"""Row-invariance of q4 mode's kernel over many rows (models/q4kernel.cpp): past one register
tile (12 rows in q4a8) each block of weights streams once and every row tile multiplies it while
it is in cache. Each row must still get the bits of a one-row forward, at any T up to a
verification tree of 32 nodes and beyond (a call's 64 rows), for every code layout, for chains
and token trees through the Python and the fused forward; and stay as close to a float64
reference as one row is."""

from __future__ import annotations

import pytest
import torch
from test_q4 import LAYOUTS, VOCAB, _a8_reference, _tiny

from veridraft.models import fused, kernels, q4kernel
from veridraft.models.q4 import Q4Linear, apply_q4
from veridraft.tree import tree_attn

ROWS = (2, 12, 13, 16, 24, 31, 32, 33, 64, 65, 70)


@pytest.fixture
def own_kernel(monkeypatch):
    if not q4kernel.cpu_supported():
        pytest.skip("this CPU has neither AVX512-BF16 nor AVX2: q4 uses torch's int4 kernel")
    monkeypatch.delenv("VERIDRAFT_Q4_KERNEL", raising=False)
    monkeypatch.setattr(q4kernel, "_loaded", {"module": q4kernel._build()})


def _linear(bits: int, group: int, k: int = 576, n: int = 96, seed: int = 0, perm=None):
    """A random q4 linear, weight = u * s + z; `perm`: its input blocks of 32 reordered."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    s = torch.rand(n, k // group, generator=g) * 0.02
    z = -torch.rand(n, k // group, generator=g) * 0.05
    bias = torch.randn(n, generator=g)
    w = u.float() * s.repeat_interleave(group, 1) + z.repeat_interleave(group, 1)
    if perm is not None:
        per = 32 // group
        u = u.reshape(n, -1, 32)[:, perm].reshape(n, k)
        gp = (perm[:, None] * per + torch.arange(per)).reshape(-1)
        s, z = s[:, gp], z[:, gp]
    return Q4Linear(u, s, z, bias, group), w


def _x(m: int, k: int = 576, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-6, 7, (m, k), generator=g))


@pytest.mark.parametrize("a8", [True, False], ids=["q4a8", "q4"])
@pytest.mark.parametrize(("bits", "group"), LAYOUTS)
def test_any_number_of_rows_gives_each_row_its_one_row_bits(own_kernel, a8, bits, group):
    if a8 and kernels.isa() != "avx512bf16":
        pytest.skip("q4a8 needs the AVX512 build")
    lin, w = _linear(bits, group)
    lin.a8 = a8
    x = _x(max(ROWS) + 5)
    one = torch.cat([lin(x[i : i + 1]) for i in range(len(x))])
    for m in ROWS:
        assert torch.equal(lin(x[:m]), one[:m]), m
        assert torch.equal(lin(x[5 : 5 + m]), one[5 : 5 + m]), m  # other rows around it
    # and the rows are the product they stand for: float64 sums of the same factors
    if a8:
        exact = _a8_reference(x, w, lin.bias)
        tol = 1e-5  # integer sums, float32 scales: float32 rounding
    else:
        exact = torch.nn.functional.linear(x.bfloat16().double(), w.double(), lin.bias.double())
        tol = 1e-6  # bfloat16 activations, exact products, float32 sums
    assert (one.double() - exact).abs().max() / exact.abs().max() < tol


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (6, 16)])
def test_control_the_bitwise_check_sees_the_order_of_the_sums(own_kernel, bits, group):
    """Control: the same products summed in another order (the input blocks permuted in both
    the weights and the activations: the same result in exact arithmetic) are close but not
    the same bits. So the equality above holds because every row keeps one order of sums, not
    because any order would give it."""
    if kernels.isa() != "avx512bf16":
        pytest.skip("q4a8 needs the AVX512 build")
    lin, _ = _linear(bits, group)
    perm = torch.randperm(576 // 32, generator=torch.Generator().manual_seed(2))
    moved, _ = _linear(bits, group, perm=perm)
    lin.a8 = moved.a8 = True
    x = _x(32)
    xp = x.reshape(32, -1, 32)[:, perm].reshape(32, -1)
    a, b = lin(x), moved(xp)
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 1e-5 * a.abs().max()


@pytest.fixture(params=[False, True], ids=["python", "fused"])
def tiny_a8(request, tmp_path, monkeypatch):
    if kernels.isa() != "avx512bf16":
        pytest.skip("q4a8 needs the AVX512 build")
    monkeypatch.delenv("VERIDRAFT_Q4_KERNEL", raising=False)
    monkeypatch.delenv("VERIDRAFT_FUSED", raising=False)
    monkeypatch.setattr(q4kernel, "_loaded", {"module": q4kernel._build()})
    torch.manual_seed(0)
    _, model, path = _tiny(tmp_path, {"attn_v": "Q5_0", "ffn_down": "Q8_0"})
    apply_q4(model, path, a8=True)
    if request.param:
        if fused.load() is None:
            pytest.fail("the fused forward did not build on a CPU with AVX512-BF16")
        assert fused.uses_fused(model)
    else:
        model.fused = None
    return model


def test_chain_of_32_rows_is_32_one_row_steps(tiny_a8):
    net = tiny_a8
    ids = torch.randint(0, VOCAB, (70,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = net.new_cache(80)
        net(ids[:30], cache)
        steps = torch.cat([net(ids[30 + i : 31 + i], cache) for i in range(33)])
        for t in (13, 16, 24, 32, 33):
            cache.truncate(30)
            assert torch.equal(net(ids[30 : 30 + t], cache), steps[:t]), t


def test_a_32_node_tree_is_its_paths_one_row_steps(tiny_a8):
    net = tiny_a8
    # a root and 31 nodes, every node with up to 3 children
    tree = tree_attn([i // 3 - 1 for i in range(31)])
    ids = torch.randint(0, VOCAB, (62,), generator=torch.Generator().manual_seed(1))
    prompt, toks = ids[:30], ids[30:]
    with torch.inference_mode():
        cache = net.new_cache(80)
        net(prompt, cache)
        many = net(toks, cache, tree=tree)
        for node, path in enumerate(tree.rows):
            cache.truncate(len(prompt))
            for a in path:
                last = net(toks[a : a + 1], cache)
            assert torch.equal(many[node], last[0]), node
