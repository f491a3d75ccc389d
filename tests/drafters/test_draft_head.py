"""The subset draft head (drafters/draft_head.py) and the hidden-states-only forward it uses."""

from __future__ import annotations

import pytest
import torch
from drafting_helpers import tiny_llama

from veridraft.drafters.draft_head import SubsetHead, draft_step
from veridraft.models.base import Capture
from veridraft.models.precision import PRECISIONS, PackedLinear, apply_precision
from veridraft.sampling import SamplingParams

PROMPT = [1, 5, 2, 9, 4, 4, 7, 3, 0, 11]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama with a tied head, as both catalog models have (the subset head reads the
    rows of the embedding table)."""
    path = tmp_path_factory.mktemp("tiny-head")
    tiny_llama(path, seed=5, layers=2, vocab=40, tie=True)
    return path


def _net(folder, precision):
    from veridraft.models import from_folder

    return apply_precision(from_folder(folder), precision)


class Refuse(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("the output head ran")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_hidden_states_only_forward_never_runs_the_head(folder, precision):
    """num_logits=0 is a drafter asking for hidden states: in bf16 a zero-row call used to be
    padded up to the row floor and ran the whole head (a draft step cost more than a plain one)."""
    net = _net(folder, precision)
    ref = net(torch.tensor(PROMPT), net.new_cache(16), num_logits=1)
    net.output = Refuse()
    cap = Capture(hidden_layers=(-1,))
    out = net(torch.tensor(PROMPT), net.new_cache(16), capture=cap, num_logits=0)
    assert out.shape == (0, net.config.vocab_size)
    assert cap.hidden[-1].shape == (len(PROMPT), net.config.dim)
    assert ref.shape == (1, net.config.vocab_size)


@pytest.mark.parametrize("precision", ["fp16w", "bf16"])
def test_packed_linear_with_no_rows_returns_no_rows(precision, monkeypatch):
    lin = PackedLinear(torch.randn(48, 32), torch.randn(48), precision)
    monkeypatch.setattr(lin, "_mm", lambda *a, **k: pytest.fail("matmul over padding rows"))
    if precision == "fp16w":
        monkeypatch.setattr(
            torch, "fbgemm_linear_fp16_weight_fp32_activation", lambda *a: pytest.fail("matmul")
        )
    assert lin(torch.randn(0, 32)).shape == (0, 48)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_subset_head_uses_the_models_kernel_and_scores_like_the_full_head(folder, precision):
    net = _net(folder, precision)
    head = SubsetHead(net, 8)
    if precision == "fp32":
        assert isinstance(head.base, torch.Tensor)
    else:  # a float32 copy of the rows would read twice the bytes of the packed full head
        assert isinstance(head.base, PackedLinear) and head.base.precision == precision
    head.observe(PROMPT + [12, 13])
    cap = Capture(hidden_layers=(-1,))
    cache = net.new_cache(16)
    full = net(torch.tensor(PROMPT), cache, capture=cap)[-1]
    sub = head.logits(cap.hidden[-1][-1])
    ids = list(range(8)) + head.extra_ids
    assert head.extra_ids == [9, 11, 12, 13]  # context ids beyond the first 8, once each
    # the first ids go through the same kernel as the model's head: its logits, to rounding
    torch.testing.assert_close(sub[:8], full[:8], rtol=0, atol=1e-5)
    # context ids are scored in float32 from the (16-bit) table rows
    torch.testing.assert_close(sub[8:], full[ids[8:]], rtol=0, atol=0.05)
    tok, conf, q = draft_step(
        net,
        [PROMPT[-1]],
        cache,
        head=head,
        sampling=SamplingParams(),
        sampled=False,
        generator=None,
    )
    assert tok in ids and 0.0 < conf <= 1.0 and q is None
