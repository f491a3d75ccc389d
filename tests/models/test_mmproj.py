"""Qwen2-VL / Qwen2.5-VL from llama.cpp's pair (the language model's GGUF and its mmproj): the
logits of text, image and video prompts equal, bit for bit, those of the HF folder holding the
same weights, in every mode (fp32, bf16, fp16w; q4 / q4a8 against the HF folder's model made q4
from the same GGUF); a tensor swapped in either file changes them; a wrong, missing or foreign
mmproj is a one-line error naming the fix. The pair is written with gguf's own name tables
(mmproj_helpers.py), so the reader is checked against the converter's naming."""

from __future__ import annotations

import dataclasses
import shutil

import mmproj_helpers as H
import pytest
import torch

import veridraft
from veridraft import models
from veridraft.errors import VeridraftError
from veridraft.models import catalog, mmproj, q4kernel
from veridraft.models.q4 import Q4Linear, apply_q4
from veridraft.vision.chat import vision_prompt

pytest.importorskip("PIL")

FAMILIES = ["qwen2_5_vl", "qwen2_vl"]


@pytest.fixture(scope="module", autouse=True)
def models_home(tmp_path_factory):
    """The pairs' folders (config and tokenizer read out once) go to a folder of this module's."""
    home = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(catalog, "models_dir", lambda: home)
        yield home


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(family, HF folder, GGUF, mmproj, the HF folder's fp32 network)."""
    family = request.param
    out = tmp_path_factory.mktemp(family)
    folder, gguf, proj = H.write_pair(H.make_hf_model(family, 3), out, family)
    return family, folder, gguf, proj, models.from_folder(folder, "fp32")


@pytest.fixture(scope="module")
def loaded(pair):
    _, _, gguf, proj, _ = pair
    return veridraft.load(gguf, precision="fp32", mmproj=proj)


def media(kind: str) -> list:
    return {
        "text": [],
        "image": [H.image()],
        "video": [H.video()],
        "image and video": [H.image(), H.video()],
    }[kind]


def logits(net, items) -> torch.Tensor:
    ids = H.prompt_of(items)
    with torch.inference_mode(), net.use_prompt(vision_prompt(net, ids, items)):
        return net(torch.tensor(ids), net.new_cache(len(ids) + 4))


@pytest.mark.parametrize("kind", ["text", "image", "video", "image and video"])
def test_fp32_logits_equal_the_hf_folders(pair, loaded, kind):
    family, _, _, _, ref = pair
    got = loaded.net
    assert got.config.model_type == family and loaded.precision == "fp32"
    # the same model; the token ids are the GGUF's tokenizer's, the rope dicts spelled otherwise
    same = dict(bos_token_id=0, eos_token_ids=[], rope={}, vision={})
    assert dataclasses.replace(got.config, **same) == dataclasses.replace(ref.config, **same)
    assert got.vision_config == ref.vision_config
    items = media(kind)
    assert torch.equal(logits(loaded.net, items), logits(ref, items))


def test_the_tower_is_the_hf_folders_bit_for_bit(pair, loaded):
    """qkv fused back from q, k, v; the Conv3d stacked back from its two temporal slices."""
    ref = pair[4]
    got, want = loaded.net.vision_weights, ref.vision_weights
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k


def test_the_tokenizer_and_the_vision_ids_come_from_the_gguf(loaded):
    tok = loaded.tokenizer
    assert loaded.net.token_ids == {"image": H.IMAGE, "video": H.VIDEO, "vision_start": H.START}
    assert tok.token_to_id("<|image_pad|>") == H.IMAGE
    assert tok.encode("<|vision_start|>he") == [H.START, 256]  # specials whole, the merge
    assert H.ID["<|im_end|>"] in tok.eos_ids


@pytest.mark.parametrize("precision", ["bf16", "fp16w"])
def test_packed_modes_equal_the_hf_folders(pair, loaded, precision):
    _, folder, _, _, _ = pair
    got = models.from_folder(loaded.path, precision)
    want = models.from_folder(folder, precision)
    assert got.precision == precision
    items = media("image and video")
    assert torch.equal(logits(got, items), logits(want, items))
    assert not any(loaded.path.glob("**/*.safetensors"))  # read from the GGUF, no copy made


def test_q4_runs_the_ggufs_blocks_with_a_float32_tower(pair, loaded):
    """q4 (q4a8 where the CPU has it) from the pair equals the HF folder's model made q4 from the
    same GGUF (apply_q4 checks each linear's rows against the float32 weights)."""
    _, folder, gguf, _, ref = pair
    precision = "q4a8" if q4kernel.a8_supported() else "q4"
    got = models.from_folder(loaded.path, precision)
    want = apply_q4(models.from_folder(folder, "fp32"), gguf, a8=precision == "q4a8")
    assert got.precision == precision
    assert isinstance(got.layers[0].attention.wqkv, Q4Linear)
    assert all(torch.equal(got.vision_weights[k], v) for k, v in ref.vision_weights.items())
    for kind in ("text", "image and video"):
        items = media(kind)
        assert torch.equal(logits(got, items), logits(want, items))


def test_auto_picks_a_mode_that_runs_the_gguf(pair):
    """The pair has its GGUF, so "auto" may choose the q4 modes, as for a text GGUF."""
    _, _, gguf, proj, _ = pair
    model = veridraft.load(gguf, mmproj=proj)
    assert model.precision in ("fp32", "bf16", "fp16w", "q4", "q4a8") and model.chosen


@pytest.mark.parametrize(
    "swap",
    [
        ("blk.1.attn_k.weight", "blk.1.attn_v.weight"),  # the decoder's GGUF
        ("v.blk.0.attn_k.weight", "v.blk.0.attn_v.weight"),  # the tower's mmproj
        ("v.patch_embd.weight", "v.patch_embd.weight.1"),  # the Conv3d's temporal slices
    ],
)
def test_a_swapped_tensor_changes_the_logits(pair, tmp_path, swap):
    """The parity above has teeth: a file with two tensors swapped gives other logits (the
    tower's swaps leave a text prompt alone and change the media's)."""
    family, _, _, _, ref = pair
    _, gguf, proj = H.write_pair(H.make_hf_model(family, 3), tmp_path, family, swap=swap)
    net = veridraft.load(gguf, precision="fp32", mmproj=proj).net
    items = media("image and video")
    assert not torch.allclose(logits(net, items), logits(ref, items), atol=1e-3)
    text_same = torch.equal(logits(net, []), logits(ref, []))
    assert text_same == swap[0].startswith("v.")


def one_line(fn, *words: str) -> str:
    with pytest.raises(VeridraftError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_the_mmproj_beside_the_gguf_or_in_its_folder_is_found(pair, tmp_path):
    _, _, gguf, proj, ref = pair
    items = media("image")
    beside = veridraft.load(gguf, precision="fp32")  # the mmproj-*.gguf in the same folder
    assert torch.equal(logits(beside.net, items), logits(ref, items))
    folder = veridraft.load(gguf.parent, precision="fp32")  # llama.cpp's files in a folder
    assert folder.path == beside.path
    shutil.copy(proj, tmp_path / "mmproj-other.gguf")
    shutil.copy(proj, tmp_path / "mmproj-again.gguf")
    shutil.copy(gguf, tmp_path / gguf.name)
    one_line(lambda: veridraft.load(tmp_path / gguf.name), "several mmproj", "mmproj=PATH")
    chosen = veridraft.load(tmp_path / gguf.name, "fp32", mmproj=tmp_path / "mmproj-other.gguf")
    assert torch.equal(logits(chosen.net, items), logits(ref, items))


def test_a_missing_mmproj_names_the_flag(pair, tmp_path):
    _, _, gguf, _, _ = pair
    alone = tmp_path / gguf.name
    shutil.copy(gguf, alone)
    one_line(lambda: veridraft.load(alone), "no mmproj", "--mmproj")
    one_line(lambda: veridraft.load(alone, mmproj=tmp_path / "nope.gguf"), "does not exist")


def test_files_in_the_wrong_places_are_one_line_errors(pair):
    _, folder, gguf, proj, _ = pair
    one_line(lambda: veridraft.load(proj), "is an mmproj", "mmproj=PATH")
    one_line(lambda: veridraft.load(gguf, mmproj=gguf), "is not an mmproj", "'qwen2vl'")
    one_line(lambda: veridraft.load(folder, mmproj=proj), "HF folder", "without mmproj")


def test_a_text_gguf_with_an_mmproj_is_refused(pair, tmp_path):
    from gguf import GGUFWriter

    text = tmp_path / "text.gguf"
    w = GGUFWriter(text, "qwen2")
    w.add_tensor("token_embd.weight", torch.zeros(4, 32).numpy())
    H._close(w)
    one_line(lambda: veridraft.load(text, mmproj=pair[3]), "'qwen2' model", "without mmproj")


def test_another_projector_is_refused(pair, tmp_path):
    from gguf import GGUFWriter

    other = tmp_path / "mmproj-gemma.gguf"
    w = GGUFWriter(other, "clip")
    w.add_string("clip.projector_type", "gemma3")
    w.add_tensor("mm.input_projection.weight", torch.zeros(4, 32).numpy())
    H._close(w)
    one_line(lambda: veridraft.load(pair[2], mmproj=other), "'gemma3'", "qwen2.5vl_merger")


def test_an_mmproj_of_another_width_is_not_the_pair(pair, tmp_path):
    """A decoder 64 wide and a tower whose rows are 32: named, not a shape error later."""
    family = pair[0]
    wide = H.make_hf(
        family,
        4,
        tokens=H.TOKENS,
        vocab_size=H.VOCAB,
        intermediate_size=64,
        hidden_size=64,
        rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]},
    )
    _, gguf, _ = H.write_pair(wide, tmp_path, family)
    one_line(lambda: veridraft.load(gguf, mmproj=pair[3]), "not a pair", "rows of 32")


def test_a_qwen2_5_vl_mmproj_without_its_window_pattern_is_refused(tmp_path):
    """Which blocks attend over the whole frame is in the file only: not guessed."""
    hf = H.make_hf_model("qwen2_5_vl", 3)
    skip = ("clip.vision.n_wa_pattern",)
    _, gguf, proj = H.write_pair(hf, tmp_path, "qwen2_5_vl", skip=skip)
    one_line(lambda: veridraft.load(gguf, mmproj=proj), "n_wa_pattern", "re-convert")


def test_q4_on_the_hf_folder_still_names_the_pair(pair):
    one_line(lambda: models.from_folder(pair[1], "q4"), "HF folder only", "mmproj=PATH")


def test_the_metadata_reader_agrees_with_ggufs(pair):
    from gguf import GGUFReader

    _, _, gguf, proj, _ = pair
    for path in (gguf, proj):
        ours = mmproj.read_metadata(path)
        reader = GGUFReader(path)
        for key, field in reader.fields.items():
            if key.startswith(("GGUF.", "tokenizer.ggml.")):
                continue
            assert ours[key] == field.contents(), key
