"""Per-head views and attention capture in the forward (models/base.py `make_span`/`attend`).

A per-head view [n_kv_heads, B] must give the logits of an explicit computation: the same keys
copied head by head into a compact cache, read through a plain one-row-per-position view. The
capture must report softmax weights of the chosen rows without changing the forward's output.
"""

from __future__ import annotations

import pytest
import torch
from drafting_helpers import tiny_llama

from veridraft.models.base import Capture


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-views"), layers=3, vocab=32)


def test_per_head_view_equals_explicit_compact_cache(tiny):
    n, t = 40, 3
    seq = torch.randint(0, 32, (n + t,), generator=torch.Generator().manual_seed(1))
    cache = tiny.new_cache(64)
    tiny(seq[:n], cache)
    g = torch.Generator().manual_seed(2)
    view = torch.stack([torch.randperm(n, generator=g)[:12].sort().values for _ in range(2)])
    out = tiny(seq[n:], cache, view={i: view for i in range(3)})

    # explicit: head h's chosen rows copied into rows 0..11 of a fresh cache at the same length
    # (the queries keep their positions), read through a shared 1-d view
    ref_cache = tiny.new_cache(64)
    tiny(seq[:n], ref_cache)
    for layer in range(3):
        for h in range(2):
            ref_cache.k[layer][0, h, :12] = cache.k[layer][0, h, view[h]]
            ref_cache.v[layer][0, h, :12] = cache.v[layer][0, h, view[h]]
    ref = tiny(seq[n:], ref_cache, view=torch.arange(12))
    assert (out - ref).abs().max().item() < 1e-5
    # and a per-head view whose rows agree is the shared view
    same = torch.stack([view[0], view[0]])
    c2, c3 = tiny.new_cache(64), tiny.new_cache(64)
    tiny(seq[:n], c2), tiny(seq[:n], c3)
    a = tiny(seq[n:], c2, view=same)
    b = tiny(seq[n:], c3, view=view[0])
    assert (a - b).abs().max().item() < 1e-5
    assert not torch.allclose(out, a)


def test_capture_reports_attention_without_changing_the_forward(tiny):
    n, r = 30, 4
    seq = torch.randint(0, 32, (n,), generator=torch.Generator().manual_seed(3))
    plain = tiny(seq, tiny.new_cache(64))
    cap = Capture(attn_rows=r, queries=True)
    cache = tiny.new_cache(64)
    logits = tiny(seq, cache, capture=cap)
    assert torch.equal(plain, logits)
    assert set(cap.attn) == {0, 1, 2}
    for layer, a in cap.attn.items():
        assert a.shape == (4, n)
        assert torch.allclose(a.sum(-1), torch.full((4,), float(r)), atol=1e-5)  # r rows
        q = cap.query[layer]  # [heads, r, hd]
        k = cache.k[layer][0].repeat_interleave(2, 0)  # kv head -> its query heads
        s = q @ k[:, :n].transpose(-1, -2) * q.shape[-1] ** -0.5
        qpos = torch.arange(n - r, n)
        s = s.masked_fill(torch.arange(n)[None, :] > qpos[:, None], float("-inf"))
        assert (s.softmax(-1).sum(1) - a).abs().max().item() < 1e-5
