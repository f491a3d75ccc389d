"""A packed precision mode keeps no float32 weights: not in the model, not as a mapped file, and
not all at once while packing (from a folder one float32 matrix is read at a time; from a float32
model, peak = float32 model + one packed linear, not + the whole packed model). Tiny random Qwen2 checkpoints; the real figures are in the benchmark reports."""

from __future__ import annotations

import gc
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from veridraft.models import from_folder
from veridraft.models import precision as precision_mod

PACKED = ["fp16w", "bf16"]


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> Path:
    cfg = transformers.Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    transformers.Qwen2ForCausalLM(cfg).float().save_pretrained(folder)
    return folder


def _float32_matrices() -> list[torch.Tensor]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return [o for o in objs if o.dtype == torch.float32 and o.dim() == 2]


@pytest.mark.parametrize("precision", PACKED)
def test_packed_model_holds_no_float32_weights_and_no_mapped_file(qwen_folder, precision):
    before = {id(t) for t in _float32_matrices()}
    net = from_folder(qwen_folder, precision=precision)
    assert not any(isinstance(m, nn.Linear) for m in net.modules())
    left = [t for t in _float32_matrices() if id(t) not in before]
    assert left == [], [tuple(t.shape) for t in left]
    # the checkpoint is read tensor by tensor: no mapping of it stays behind
    maps = Path("/proc/self/maps")
    if maps.is_file():
        mapped = maps.read_text()
        # a pulled folder keeps its float32 copy in float32/, an HF folder at its top
        for weights in (qwen_folder / "model.safetensors", qwen_folder / "float32"):
            assert str(weights) not in mapped
    del net


def test_packing_frees_each_float32_weight_before_the_next(qwen_folder, monkeypatch):
    net = from_folder(qwen_folder, precision="fp32")
    refs = [weakref.ref(m.weight) for m in net.modules() if isinstance(m, nn.Linear)]
    alive_at_call = []
    real_init = precision_mod.PackedLinear.__init__

    def counting_init(self, weight, bias, precision):
        alive_at_call.append(sum(r() is not None for r in refs))
        real_init(self, weight, bias, precision)

    monkeypatch.setattr(precision_mod.PackedLinear, "__init__", counting_init)
    precision_mod.apply_precision(net, "bf16")
    assert len(alive_at_call) == len(refs)
    # one fewer float32 weight is alive at each call: the replaced linear is gone at once
    assert alive_at_call == list(range(len(refs), 0, -1))
    assert sum(r() is not None for r in refs) == 0
