"""An untied head in a packed mode (the Qwen drafts' case): its 16-bit weights are read back from
the packed kernel, exactly, so the subset draft head works as for tied heads; still lossless."""

from __future__ import annotations

import pytest
import torch
from drafting_helpers import tiny_llama

from veridraft.decode import decode
from veridraft.drafters.draft_head import head_weight
from veridraft.drafters.model import ModelDrafter
from veridraft.models import from_folder
from veridraft.sampling import SamplingParams

HALF = {"fp16w": torch.float16, "bf16": torch.bfloat16}
PROMPT = [1, 5, 2, 9, 4, 4, 7, 3, 0, 11]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-untied")
    tiny_llama(path, seed=3, layers=2, vocab=48, tie=False)
    return path


@pytest.mark.parametrize("precision", ["fp16w", "bf16"])
def test_packed_untied_head_reads_back_exactly(folder, precision):
    ref = from_folder(folder).output.weight.detach().to(HALF[precision])
    net = from_folder(folder, precision=precision)
    if net.output.packed is not None or net.output.onednn is not None:
        assert net.output.weight is None  # packed: no tensor of the weights
    else:  # bf16 where oneDNN cannot prepack (no AVX512-BF16): the padded bf16 tensor is kept
        assert net.output.weight is not None
    w = head_weight(net)
    assert w is not None and w.dtype == HALF[precision]
    assert torch.equal(w, ref)
    assert head_weight(net) is w  # read back once


@pytest.mark.parametrize("precision", ["fp16w", "bf16"])
def test_subset_head_on_an_untied_packed_draft_is_lossless(folder, precision):
    net = from_folder(folder, precision=precision)

    def run(drafter=None):
        return decode(
            net,
            PROMPT,
            max_new_tokens=24,
            sampling=SamplingParams(),
            generator=torch.Generator(),
            drafter=drafter,
        )

    plain, _ = run()
    drafter = ModelDrafter(net, num_tokens=4, mode="fixed", draft_vocab=16, target_vocab=48)
    assert drafter._head is not None
    out, stats = run(drafter)
    assert out == plain and stats.drafted > 0
