"""veridraft's decode attention kernel (models/attnkernel.cpp): close to float64 attention over
the keys each row names (by its rule for a bfloat16 cache: the query rounded to bfloat16, the
weights too), and row-invariant: a row's output is bitwise the same whatever other rows share
the call and however many threads run it."""

from __future__ import annotations

import math

import pytest
import torch

from veridraft.models import attnkernel, kernels


@pytest.fixture(scope="module")
def kernel():
    if not kernels.cpu_supported():
        pytest.skip("this CPU has no AVX512-BF16: attention keeps torch's kernels")
    # a failed build is a failure here, not a silent fallback to torch
    return kernels.build("attn", attnkernel.SOURCE, kernels.FLAGS, "the decode attention kernel")


def reference(q, k, v, lo, hi, ext, scale, softcap):
    """float64 attention of row t of head h over positions [lo[t], hi[t]) then ext[h, t]."""
    n_h, t_rows, hd = q.shape
    n_kv = k.shape[1]
    out = torch.zeros(t_rows, n_h * hd, dtype=torch.float64)
    for h in range(n_h):
        g = h // (n_h // n_kv)
        for t in range(t_rows):
            pos = list(range(int(lo[t]), int(hi[t])))
            if ext is not None:
                e = ext[min(g, ext.shape[0] - 1), min(t, ext.shape[1] - 1)]
                pos += [int(p) for p in e if p >= 0]
            kk = k[0, g, pos].double()
            s = kk @ q[h, t].double() * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            out[t, h * hd : (h + 1) * hd] = torch.softmax(s, 0) @ v[0, g, pos].double()
    return out


# float32 caches: float32 FMAs. bfloat16 caches: the weights e^(s - max) are rounded to bfloat16
# before they multiply the values, a relative error of at most 2^-9 per weight.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3}


def expected(q, k, v, lo, hi, ext, scale, softcap):
    """The float64 reference of the kernel's rule: over a bfloat16 cache the query is rounded
    to bfloat16 (the keys already are)."""
    if k.dtype == torch.bfloat16:
        q = q.to(torch.bfloat16).float()
    return reference(q, k, v, lo, hi, ext, scale, softcap)


def make(hd, n_h, n_kv, length, rows, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_h, rows, hd, generator=g)
    k = (torch.randn(1, n_kv, length, hd, generator=g) * 2).to(dtype)
    v = torch.randn(1, n_kv, length, hd, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("hd", [8, 24, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chain_rows_match_float64(kernel, hd, dtype):
    # GQA 3 heads per KV head; 5 verification rows ending at 700 (several 128-key blocks)
    q, k, v = make(hd, 6, 2, 700, 5, dtype)
    hi = torch.arange(696, 701)
    lo = torch.zeros(5, dtype=torch.long)
    scale = 1 / math.sqrt(hd)
    got = kernel.rows(q, k, v, lo, hi, None, scale, 0.0)
    want = expected(q, k, v, lo, hi, None, scale, None)
    assert got.dtype == torch.float32 and got.shape == (5, 6 * hd)
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_windows_ext_and_softcap_match_float64(kernel):
    # rows with their own windows, a per-KV-head list of extra positions with -1 holes (a view
    # or a tree's ancestors), and a softcap (Gemma 2)
    q, k, v = make(64, 4, 2, 900, 4, torch.bfloat16, seed=1)
    lo = torch.tensor([0, 250, 600, 899])
    hi = torch.tensor([300, 260, 880, 899])
    ext = torch.full((2, 4, 5), -1, dtype=torch.long)
    ext[0, 0, :3] = torch.tensor([400, 5, 899])
    ext[1, 2, :5] = torch.tensor([1, 2, 3, 890, 891])
    ext[0, 3, :1] = 899
    ext[1, 3, :2] = torch.tensor([10, 899])
    got = kernel.rows(q, k, v, lo, hi, ext, 0.125, 30.0)
    want = expected(q, k, v, lo, hi, ext, 0.125, 30.0)
    torch.testing.assert_close(got.double(), want, rtol=TOL[k.dtype], atol=TOL[k.dtype])


def test_a_row_is_bitwise_its_single_row_call(kernel):
    # verification rows sharing a start (the reuse path) and tree-like rows with ext: each row
    # is bitwise what a one-row call gives, at every thread count
    q, k, v = make(64, 9, 3, 1500, 8, torch.bfloat16, seed=2)
    lo = torch.tensor([0, 0, 0, 0, 100, 100, 0, 0])
    hi = torch.tensor([1493, 1494, 1495, 1496, 1490, 1490, 1400, 1497])
    ext = torch.full((1, 8, 3), -1, dtype=torch.long)
    ext[0, 4] = torch.tensor([1491, 1493, -1])
    ext[0, 5] = torch.tensor([1492, 1494, 1495])
    together = kernel.rows(q, k, v, lo, hi, ext, 0.125, 0.0)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for t in range(8):
                one = kernel.rows(
                    q[:, t : t + 1].contiguous(),
                    k,
                    v,
                    lo[t : t + 1],
                    hi[t : t + 1],
                    ext[:, t : t + 1].contiguous(),
                    0.125,
                    0.0,
                )
                assert torch.equal(one[0], together[t]), (n, t)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_reference_check_can_fail(kernel, dtype):
    # controls: one key fewer than the row names, or a query not rounded as the rule says, is
    # a measurable difference, so the float64 comparisons above would catch an off-by-one in
    # the key ranges or a change of arithmetic
    q, k, v = make(64, 2, 1, 150, 1, dtype, seed=3)
    lo, hi = torch.tensor([0]), torch.tensor([150])
    got = kernel.rows(q, k, v, lo, hi - 1, None, 0.125, 0.0)
    want = expected(q, k, v, lo, hi, None, 0.125, None)
    assert not torch.allclose(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
    got = kernel.rows(q, k, v, lo, hi, None, 0.125, 0.0)
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
    if dtype == torch.bfloat16:
        q = q * 8  # sharper scores: the query's rounding matters
        got = kernel.rows(q, k, v, lo, hi, None, 0.125, 0.0)
        unrounded = reference(q, k, v, lo, hi, None, 0.125, None)
        assert not torch.allclose(got.double(), unrounded, rtol=TOL[dtype], atol=TOL[dtype])
        want = expected(q, k, v, lo, hi, None, 0.125, None)
        torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
