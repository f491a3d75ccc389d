"""The GGUF is the model file: q4 / q4a8 built from a folder holding only the GGUF (and the config
and tokenizer read out of it) equal, bit for bit, the q4 model made from the float32 folder
transformers converts the same GGUF into (the way veridraft loaded q4 before it kept no float32
copy). The hermetic versions of these checks are in tests/models/test_q4.py (a tiny GGUF)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from veridraft.models import (
    _config,
    _GGUFStateDict,
    _LazyStateDict,
    _weight_files,
    convert,
    from_folder,
    from_hf_config_and_state_dict,
    q4kernel,
)
from veridraft.models.catalog import float32_copy, has_float32
from veridraft.models.q4 import apply_q4

METADATA = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def _q4_precision() -> str:
    return "q4a8" if q4kernel.a8_supported() else "q4"


@pytest.mark.slow
def test_gguf_only_folder_loads_q4_bit_for_bit_as_the_float32_folder(tmp_path, real_model_dir):
    gguf = real_model_dir("smollm2-135m") / "source.gguf"
    only = tmp_path / "gguf-only"
    convert.write_metadata(gguf, only)
    shutil.copy(gguf, only / "source.gguf")
    full = convert.convert_gguf(gguf, tmp_path / "float32")  # what a pull wrote before
    for f in METADATA:  # the same config and tokenizer files
        assert (only / f).read_bytes() == (full / f).read_bytes(), f
    assert not any(only.glob("*.safetensors"))

    # every tensor the GGUF gives under its HF name is the float32 folder's, bit for bit
    cfg = _config(only)
    sd = _GGUFStateDict(only / "source.gguf", cfg)
    ref = _LazyStateDict(_weight_files(full))
    assert set(sd) == set(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k

    # q4 from the GGUF alone == the float32 model made q4 (its linears checked row by row)
    prec = _q4_precision()
    new = from_folder(only, precision=prec)
    old = from_hf_config_and_state_dict(_config(full), ref)
    apply_q4(old, only / "source.gguf", a8=prec == "q4a8")
    ids = torch.tensor([1, 504, 3622, 314, 260, 1488, 30, 2, 45, 99, 1200, 7, 13, 800])
    with torch.inference_mode():
        assert torch.equal(new(ids, new.new_cache(32)), old(ids, old.new_cache(32)))
    assert not (only / "float32").exists()  # q4 never made the float32 copy


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-coder-0.5b"])
def test_gguf_tensors_are_the_float32_folders(real_model_dir, name):
    """Gemma 3 (norms stored as 1 + w) and Qwen2 (q/k/v biases, no row permutation): the
    non-linear tensors de-quantized from the GGUF equal the float32 weights, and the linears'
    rows in `row_order` de-quantize to them (sampled rows)."""
    folder = real_model_dir(name)
    if not has_float32(folder):
        float32_copy(folder, "fp32")  # minutes, once: the reference
    weights = folder if any(folder.glob("*.safetensors")) else folder / "float32"
    ref = _LazyStateDict(_weight_files(weights))
    cfg = _config(folder)
    sd = _GGUFStateDict(folder / "source.gguf", cfg)
    assert set(sd) == set(ref)
    for k, gname in sd._gguf.items():
        t = sd.file.tensors[gname]
        if len(t.shape) == 1 or "embed_tokens" in k:
            assert torch.equal(sd[k], ref[k]), k
            continue
        rows = int(t.shape[1])
        pick = np.unique(np.linspace(0, rows - 1, 5).astype(int))
        assert torch.equal(sd[k][pick], ref.rows(k, pick)), k  # rows in row_order
