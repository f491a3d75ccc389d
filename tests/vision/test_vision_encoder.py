"""The vision tower against transformers' `model.visual` on tiny random-weight Qwen2.5-VL and
Qwen2-VL models (fp32): images and videos of odd sizes, the checkpoint's tensor names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from veridraft.errors import VeridraftError
from veridraft.vision import encoder as E
from veridraft.vision import processor as P

pytest.importorskip("PIL")


def inputs() -> list[P.VisionInput]:
    """An odd-sized image and a 5-frame odd-sized video, through our processor."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (101, 163, 3), dtype=np.uint8)
    frames = list(rng.integers(0, 256, (5, 87, 150, 3), dtype=np.uint8))
    return [
        P.process_image(image, max_pixels=48 * 28 * 28),
        P.process_video(frames, min_pixels=28 * 28, max_pixels=24 * 28 * 28),
    ]


def reference(model, items: list[P.VisionInput]) -> torch.Tensor:
    pixels = torch.cat([v.pixel_values for v in items])
    grid = torch.tensor([v.grid_thw for v in items])
    with torch.no_grad():
        return model.model.visual(pixels, grid_thw=grid).pooler_output


def ours(model, items: list[P.VisionInput], state_dict=None) -> torch.Tensor:
    config = E.VisionConfig.from_hf(model.config.to_dict())
    weights = E.load_vision_weights(state_dict or model.state_dict(), config)
    pixels = torch.cat([v.pixel_values for v in items])
    return E.encode(weights, config, pixels, [v.grid_thw for v in items])


@pytest.mark.parametrize("which", ["image", "video", "both"])
def test_qwen2_5_vl_tower_equals_transformers(tiny_qwen2_5_vl, which):
    image, video = inputs()
    items = {"image": [image], "video": [video], "both": [image, video]}[which]
    want = reference(tiny_qwen2_5_vl, items)
    got = ours(tiny_qwen2_5_vl, items)
    assert got.shape == (sum(v.num_tokens for v in items), 32)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_qwen2_5_vl_windows_really_split_the_frames(tiny_qwen2_5_vl):
    """The parity above covers windowed blocks: the inputs span several windows per frame, and
    the tower's output changes if every block attends to the whole frame instead."""
    image, video = inputs()
    config = E.VisionConfig.from_hf(tiny_qwen2_5_vl.config.to_dict())
    grids = [image.grid_thw, video.grid_thw]
    _, windows = E.window_order(config, grids)
    assert len(windows) > 2 * len(E.frame_lengths(grids))
    weights = E.load_vision_weights(tiny_qwen2_5_vl.state_dict(), config)
    pixels = torch.cat([image.pixel_values, video.pixel_values])
    windowed = E.encode(weights, config, pixels, grids)
    config.fullatt_block_indexes = tuple(range(config.depth))
    assert not torch.allclose(windowed, E.encode(weights, config, pixels, grids), atol=1e-3)


@pytest.mark.parametrize("which", ["image", "both"])
def test_qwen2_vl_tower_equals_transformers(tiny_qwen2_vl, which):
    image, video = inputs()
    items = [image] if which == "image" else [image, video]
    want = reference(tiny_qwen2_vl, items)
    got = ours(tiny_qwen2_vl, items)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_loads_a_saved_checkpoint_in_either_naming(tiny_qwen2_5_vl, tmp_path):
    """From `save_pretrained` files: config.json and safetensors, with transformers 5's
    `model.visual.*` names and with the released checkpoints' `visual.*` names."""
    from safetensors.torch import load_file

    tiny_qwen2_5_vl.save_pretrained(tmp_path)
    config = E.VisionConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert (config.family, config.window_size, config.fullatt_block_indexes) == (
        "qwen2_5_vl",
        56,
        (1,),
    )
    saved = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if "visual" in k}
    released = {k.removeprefix("model."): v for k, v in saved.items()}
    items = inputs()[:1]
    want = reference(tiny_qwen2_5_vl, items)
    for state in (saved, released):
        weights = E.load_vision_weights(state, config)
        got = E.encode(weights, config, items[0].pixel_values, [items[0].grid_thw])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_released_config_shapes():
    """The config.json layouts of the released models (flat vision_config, no rope fields)."""
    v25 = {
        "model_type": "qwen2_5_vl",
        "vision_config": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 2048,
            "in_chans": 3,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "hidden_act": "silu",
        },
    }
    c = E.VisionConfig.from_hf(v25)
    assert (c.family, c.head_dim, c.out_hidden_size, c.tokens_per_second) == (
        "qwen2_5_vl",
        80,
        2048,
        2,
    )
    v2 = {
        "model_type": "qwen2_vl",
        "vision_config": {
            "depth": 32,
            "embed_dim": 1280,
            "mlp_ratio": 4,
            "num_heads": 16,
            "in_chans": 3,
            "hidden_size": 1536,
        },
    }
    c = E.VisionConfig.from_hf(v2)
    assert (c.family, c.hidden_size, c.out_hidden_size, c.intermediate_size) == (
        "qwen2_vl",
        1280,
        1536,
        5120,
    )
    with pytest.raises(VeridraftError, match="not a Qwen2-VL"):
        E.VisionConfig.from_hf({"model_type": "llama", "hidden_size": 64})


def test_bad_weights_and_shapes_name_the_fix(tiny_qwen2_vl):
    config = E.VisionConfig.from_hf(tiny_qwen2_vl.config.to_dict())
    state = dict(tiny_qwen2_vl.state_dict())
    with pytest.raises(VeridraftError, match="no visual"):
        E.load_vision_weights({"lm_head.weight": torch.zeros(1)}, config)
    del state["model.visual.blocks.1.mlp.fc2.bias"]
    with pytest.raises(VeridraftError, match="blocks.1.mlp.fc2.bias"):
        E.load_vision_weights(state, config)
    weights = E.load_vision_weights(tiny_qwen2_vl.state_dict(), config)
    with pytest.raises(VeridraftError, match="do not match grids"):
        E.encode(weights, config, torch.zeros(10, 1176), [(1, 4, 4)])
