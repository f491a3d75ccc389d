"""The decode attention kernel (models/attnkernel.cpp) is bitwise the kernel before its rows and
query heads shared their passes over a block (attnkernel_reference.cpp, next to this file): the
same products, summation order, blocks and merges for every row, so verification stays bitwise
plain decoding. Compared on random bfloat16 and float32 caches, chains, prompt rows, windows,
trees (ext keys with holes), GQA groups 1-7, head dims 64, 128 and an unpadded 80, softcap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from veridraft.models import attnkernel, kernels

REFERENCE = Path(__file__).with_name("attnkernel_reference.cpp")


@pytest.fixture(scope="module")
def builds():
    if not kernels.cpu_supported():
        pytest.skip("this CPU has no AVX512-BF16: attention keeps torch's kernels")
    new = kernels.build("attn", attnkernel.SOURCE, kernels.FLAGS, "the decode attention kernel")
    ref = kernels.build("attnref", REFERENCE, kernels.FLAGS, "the reference attention kernel")
    return new, ref


def make(hd, n_h, n_kv, length, rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_h, rows, hd, generator=g)
    k = (torch.randn(1, n_kv, length, hd, generator=g) * 2).to(dtype)
    v = torch.randn(1, n_kv, length, hd, generator=g).to(dtype)
    return q, k, v


def same(builds, q, k, v, lo, hi, ext, scale=0.125, softcap=0.0):
    new, ref = builds
    a = new.rows(q, k, v, lo, hi, ext, scale, softcap)
    b = ref.rows(q, k, v, lo, hi, ext, scale, softcap)
    assert a.shape == b.shape and not a.isnan().any()
    return torch.equal(a, b)


@pytest.mark.parametrize("hd", [64, 128, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chains_and_prompt_rows_are_bitwise_the_reference(builds, hd, dtype):
    # verification chains ending at 1,100 (blocks of 128 keys, units of 4 blocks, a partial last
    # block per row) and prompt rows from 0 (rows of different lengths in every block), for
    # every T and GQA group size
    for i, t in enumerate((1, 2, 3, 8, 16, 33, 64)):
        for group in range(1, 8):
            n_kv = 2 if group < 5 else 1
            q, k, v = make(hd, group * n_kv, n_kv, 1100, t, dtype, seed=100 * i + group)
            lo = torch.zeros(t, dtype=torch.long)
            chain = torch.arange(1100 - t + 1, 1101)
            assert same(builds, q, k, v, lo, chain, None), ("chain", t, group)
            prompt = torch.arange(1, t + 1) + 200 * (t % 3)
            assert same(builds, q, k, v, lo, prompt, None), ("prompt", t, group)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_windows_trees_and_softcap_are_bitwise_the_reference(builds, dtype):
    for hd, group, t in ((64, 3, 16), (128, 6, 8), (64, 7, 33), (128, 1, 64)):
        q, k, v = make(hd, 2 * group, 2, 900, t, dtype, seed=hd + group)
        g = torch.Generator().manual_seed(t)
        # sliding-window prompt rows: lo moves with the row
        pos = torch.arange(900 - t, 900)
        assert same(builds, q, k, v, (pos - 300).clamp(min=0), pos + 1, None)
        # tree rows: a shared prefix then per-row, per-KV-head ancestors with -1 holes, some rows
        # with a prefix of their own
        lo = torch.zeros(t, dtype=torch.long)
        lo[::5] = 7
        hi = torch.full((t,), 850, dtype=torch.long)
        hi[1::4] = 640
        ext = torch.randint(850, 900, (2, t, 9), generator=g)
        ext[torch.rand(ext.shape, generator=g) < 0.3] = -1
        assert same(builds, q, k, v, lo, hi, ext)
        # one ext list for every head and row, and a softcap
        ext1 = ext[:1, :1].contiguous()
        assert same(builds, q, k, v, lo, hi, ext1, softcap=5.0)
        # every key of a row masked: empty rows
        assert same(builds, q, k, v, lo, lo, torch.full((1, 1, 3), -1, dtype=torch.long))


def test_bitwise_at_every_thread_count(builds):
    q, k, v = make(128, 12, 2, 3000, 16, torch.bfloat16, seed=5)
    lo, hi = torch.zeros(16, dtype=torch.long), torch.arange(2985, 3001)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert same(builds, q, k, v, lo, hi, None), n
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_bitwise_check_can_fail(builds, dtype):
    # controls: the same keys read in another order (two keys of a row swapped), or one block
    # fewer, give other bits, so the equalities above would catch a change of summation order
    # or of block boundaries
    new, ref = builds
    q, k, v = make(64, 6, 2, 600, 4, dtype, seed=9)
    lo, hi = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    keys = torch.arange(600).expand(1, 4, 600).contiguous()
    swapped = keys.clone()
    swapped[..., 3], swapped[..., 300] = 300, 3
    want = ref.rows(q, k, v, lo, hi, keys, 0.125, 0.0)
    assert torch.equal(new.rows(q, k, v, lo, hi, keys, 0.125, 0.0), want)
    assert not torch.equal(new.rows(q, k, v, lo, hi, swapped, 0.125, 0.0), want)
    lo, hi = torch.zeros(4, dtype=torch.long), torch.full((4,), 600)
    want = ref.rows(q, k, v, lo, hi, None, 0.125, 0.0)
    assert not torch.equal(new.rows(q, k, v, lo + 128, hi, None, 0.125, 0.0), want)
