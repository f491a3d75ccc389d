"""M-RoPE position ids against transformers' `get_rope_index` on the same ids and grids."""

from __future__ import annotations

import random

import pytest
import torch

from veridraft.errors import VeridraftError
from veridraft.vision.positions import decode_positions, mrope_cos_sin, rope_index, vision_positions

START, IMAGE, VIDEO, END = 3, 4, 5, 6  # the tiny models' vision token ids (6: any text id)


def random_prompt(rng: random.Random, merge: int = 2):
    """Text with images and videos between vision start/end tokens, and their grids."""
    ids, images, videos, seconds = [], [], [], []
    for _ in range(rng.randint(1, 4)):
        ids += [rng.randint(10, 98) for _ in range(rng.randint(0, 5))]
        grid = [rng.randint(1, 6), 2 * rng.randint(1, 7), 2 * rng.randint(1, 7)]
        if rng.random() < 0.5:
            grid[0] = 1
            images.append(grid)
            pad = IMAGE
        else:
            videos.append(grid)
            seconds.append(rng.choice([0.25, 0.5, 1.0, 1.001, 2.0, 10 / 3]))
            pad = VIDEO
        ids += [START] + [pad] * (grid[0] * grid[1] * grid[2] // merge**2) + [END]
    ids += [rng.randint(10, 98) for _ in range(rng.randint(1, 4))]
    return ids, images, videos, seconds


def transformers_rope_index(model, ids, images, videos, seconds=None):
    input_ids = torch.tensor([ids])
    types = torch.zeros_like(input_ids)
    types[input_ids == IMAGE], types[input_ids == VIDEO] = 1, 2
    kwargs = {"second_per_grid_ts": torch.tensor(seconds)} if seconds is not None else {}
    pos, delta = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=types,
        image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor(videos) if videos else None,
        **kwargs,
    )
    return pos[:, 0], int(delta)


def test_qwen2_5_vl_positions_equal_transformers(tiny_qwen2_5_vl):
    rng = random.Random(0)
    for _ in range(40):
        ids, images, videos, seconds = random_prompt(rng)
        want, want_delta = transformers_rope_index(tiny_qwen2_5_vl, ids, images, videos, seconds)
        args = (ids, images or None, videos or None, seconds)
        kw = dict(image_token_id=IMAGE, video_token_id=VIDEO, tokens_per_second=2)
        got, delta = rope_index(*args, **kw, text_after_vision="spatial")
        assert torch.equal(got, want) and delta == want_delta
        # The released models' rule agrees whenever time stays within a block's spatial extent.
        if all(int((g[0] - 1) * 2 * s) < max(g[1], g[2]) // 2 for g, s in zip(videos, seconds)):
            assert torch.equal(rope_index(*args, **kw)[0], want)


def test_qwen2_vl_positions_equal_transformers(tiny_qwen2_vl):
    rng = random.Random(1)
    for _ in range(40):
        ids, images, videos, _ = random_prompt(rng)
        want, want_delta = transformers_rope_index(tiny_qwen2_vl, ids, images, videos)
        kw = dict(image_token_id=IMAGE, video_token_id=VIDEO)
        got, delta = rope_index(ids, images, videos, **kw, text_after_vision="spatial")
        assert torch.equal(got, want) and delta == want_delta
        if all(g[0] <= max(g[1], g[2]) // 2 for g in videos):
            assert torch.equal(rope_index(ids, images, videos, **kw)[0], want)


def test_text_resumes_after_the_largest_position():
    """The worked example of the Qwen2.5-VL reference: a 3x2x2 merged video at 1 fps with 25
    tokens per second has times 0, 50, 100; the text after it starts at 101."""
    ids = [VIDEO] * 12 + [7] * 5
    pos, delta = rope_index(
        ids,
        video_grid_thw=[[3, 4, 4]],
        second_per_grid_ts=[2.0],
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        tokens_per_second=25,
    )
    assert pos[0].tolist() == [0] * 4 + [50] * 4 + [100] * 4 + [101, 102, 103, 104, 105]
    assert pos[1, :12].tolist() == [0, 0, 1, 1] * 3 and pos[2, :12].tolist() == [0, 1] * 6
    assert pos[1, 12:].tolist() == pos[0, 12:].tolist()
    assert delta == 105 + 1 - len(ids)
    assert decode_positions(len(ids), 2, delta).tolist() == [[106, 107]] * 3


def test_an_image_advances_positions_by_its_side_not_its_tokens():
    pos, delta = rope_index(
        [7, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, 8], [[1, 4, 6]], image_token_id=IMAGE
    )
    assert pos[:, -1].tolist() == [4, 4, 4]  # 1 + max(2, 3)
    assert torch.equal(pos[:, 1:7], vision_positions(1, [1, 4, 6]))
    assert delta == 4 + 1 - 8


def test_mismatched_grids_name_the_fix():
    kw = dict(image_token_id=IMAGE, video_token_id=VIDEO)
    with pytest.raises(VeridraftError, match="consecutive pad tokens"):
        rope_index([IMAGE] * 3, [[1, 4, 4]], **kw)
    with pytest.raises(VeridraftError, match="more image pad runs"):
        rope_index([IMAGE] * 4, [], **kw)
    with pytest.raises(VeridraftError, match="2 image grids"):
        rope_index([IMAGE] * 4, [[1, 4, 4], [1, 4, 4]], **kw)


def test_mrope_tables_equal_the_text_models_rotary_embedding(tiny_qwen2_5_vl):
    """cos/sin of the 3-stream positions equal transformers' text rotary embedding bitwise, and
    text positions (equal streams) give plain RoPE."""
    rng = random.Random(2)
    ids, images, videos, seconds = random_prompt(rng)
    pos, _ = rope_index(
        ids,
        images,
        videos,
        seconds,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        tokens_per_second=2,
    )
    rotary = tiny_qwen2_5_vl.model.language_model.rotary_emb
    x = torch.zeros(1, dtype=torch.float32)
    want_cos, want_sin = rotary(x, pos[:, None, :])
    head_dim = 32 // 4
    got_cos, got_sin = mrope_cos_sin(pos, head_dim, 1e6, [2, 1, 1])
    assert torch.equal(got_cos, want_cos[0]) and torch.equal(got_sin, want_sin[0])

    text = torch.arange(50).expand(3, -1)
    inv = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    plain = torch.arange(50).float()[:, None] * inv
    assert torch.equal(
        mrope_cos_sin(text, head_dim, 1e6, [2, 1, 1])[0], torch.cat([plain] * 2, -1).cos()
    )
    with pytest.raises(VeridraftError, match="mrope_section"):
        mrope_cos_sin(text, head_dim, 1e6, [2, 2, 2])
