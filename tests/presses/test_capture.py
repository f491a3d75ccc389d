"""The prefill statistics presses read (models.base.capture_press_attention) over a prompt
prefilled in chunks, as plain decoding prefills it: each chunk adds its share, and the sums
match those of one forward over the whole prompt; in a packed mode they read the bfloat16
cache."""

from __future__ import annotations

import pytest
import torch
from drafting_helpers import tiny_llama
from packed_helpers import tiny_bf16

from veridraft.models import attnkernel
from veridraft.models.base import Capture
from veridraft.presses import make_press, prefill_capture, prefill_compressed

pytestmark = pytest.mark.usefixtures("one_thread")

N = 100


def _capture(net, ids, chunk):
    cap = Capture(press_rows=90, press_colsum=True)
    with torch.no_grad():
        _, cap, logits = prefill_capture(net, ids, len(ids), cap, chunk=chunk)
    return cap, logits


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_chunked_capture_adds_up_to_one_forwards(tmp_path, mode):
    net = tiny_llama(tmp_path, seed=3) if mode == "fp32" else tiny_bf16(tmp_path)
    ids = torch.randint(0, 16, (N,), generator=torch.Generator().manual_seed(0)).tolist()
    one, logits_one = _capture(net, ids, None)
    # chunks [0, 16), [16, 32), [32, 100): the 90 window rows start in the first one
    many, logits_many = _capture(net, ids, 16)
    # the chunks' forwards attend through other kernels than one forward's tiles: a float32
    # rounding apart, more where the cache and activations are bfloat16
    tol = dict(rtol=1e-4, atol=1e-5) if mode == "fp32" else dict(rtol=0.05, atol=0.02)
    for layer in range(net.config.n_layers):
        for got, want in (
            (many.press_window, one.press_window),
            (many.press_last, one.press_last),
            (many.press_colsums, one.press_colsums),
        ):
            assert got[layer].shape == want[layer].shape == (net.config.n_heads, N)
            torch.testing.assert_close(got[layer], want[layer], **tol)
        assert len(many.press_input_parts[layer]) == 3
        torch.testing.assert_close(
            torch.tensor(many.press_input[layer]), torch.tensor(one.press_input[layer]), **tol
        )
    # each row's weights sum to 1: the window holds 90 rows, the column sums all N
    for layer in range(net.config.n_layers):
        s = many.press_window[layer].sum(-1)
        torch.testing.assert_close(s, torch.full_like(s, 90.0))
        s = many.press_colsums[layer].sum(-1)
        torch.testing.assert_close(s, torch.full_like(s, float(N)))
    if mode == "fp32":  # bf16 rounds each matmul's output: its logits move further
        torch.testing.assert_close(logits_many, logits_one, **tol)


def test_the_chunk_sums_are_checked(tmp_path):
    """Control: keeping only the last chunk's share (what one forward's capture would leave
    after a chunked prefill) does not add up."""
    net = tiny_llama(tmp_path, seed=3)
    ids = torch.randint(0, 16, (N,), generator=torch.Generator().manual_seed(0)).tolist()
    many, _ = _capture(net, ids, 16)
    cap = Capture(press_rows=90, press_colsum=True)
    full = net.new_cache(N)
    with torch.no_grad():
        net(torch.tensor(ids[:32]), full)
        net(torch.tensor(ids[32:]), full, capture=cap)  # no press_len: this forward alone
    assert cap.press_window[0].sum(-1)[0] == pytest.approx(68.0)
    assert not torch.allclose(cap.press_colsums[0], many.press_colsums[0], atol=1e-3)


def test_a_long_prompt_is_compressed_over_plain_chunks_in_bf16(tmp_path):
    """A prompt past one prefill chunk (1,024 positions) in bf16: the capture reads the
    bfloat16 cache across the chunks, every press statistic covers the whole prompt."""
    net = tiny_bf16(tmp_path)
    ids = torch.randint(0, 16, (1200,), generator=torch.Generator().manual_seed(0)).tolist()
    press = make_press("h2o:budget=64")
    cap = press.capture()
    with torch.no_grad():
        full, cap, _ = prefill_capture(net, ids, len(ids), cap)
    if attnkernel.load() is not None:
        assert full.k[0].dtype == torch.bfloat16
    assert len(cap.press_input_parts[0]) == 2  # two chunks
    s = cap.press_colsums[0].sum(-1)
    torch.testing.assert_close(s, torch.full_like(s, 1200.0))
    pre = prefill_compressed(net, ids, 1300, press)
    assert all(len(idx) == 64 for heads in pre.cache.kept for idx in heads)
