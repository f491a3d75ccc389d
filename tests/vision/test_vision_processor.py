"""The Qwen2-VL processor against transformers' own processors, on odd-sized images and on
real and generated video files."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from veridraft.errors import VeridraftError
from veridraft.vision import processor as P

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

SIZES = [(37, 91), (333, 517), (1000, 30), (29, 29), (600, 800)]


def reference_image_processor(min_pixels: int, max_pixels: int):
    """transformers' Qwen2-VL image processor built offline from its config values (the PIL
    backend: it runs without torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def reference_video_function(name: str):
    """A function of transformers' Qwen2-VL video processor module, compiled from its source.

    The module imports torchvision at the top, which CPU-only torch builds often cannot load;
    `patchify` and `smart_resize` use only torch and math, so they run on their own.
    """
    spec = importlib.util.find_spec("transformers")
    source = (
        Path(spec.origin).parent / "models" / "qwen2_vl" / "video_processing_qwen2_vl.py"
    ).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            node.decorator_list = []
            namespace = {"torch": torch, "math": math}
            exec(compile(ast.Module([node], []), "video_processing_qwen2_vl", "exec"), namespace)
            return namespace[name]
    raise AssertionError(f"{name} not found in transformers' Qwen2-VL video processor")


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("h,w", SIZES)
def test_image_rows_grid_and_tokens_equal_transformers(h, w):
    ref = reference_image_processor(P.IMAGE_MIN_PIXELS, 1280 * 28 * 28)
    image = random_image(h, w, seed=h * w)
    want = ref(images=[image], return_tensors="pt")
    got = P.process_image(image, max_pixels=1280 * 28 * 28)
    assert list(got.grid_thw) == want["image_grid_thw"][0].tolist()
    assert torch.equal(got.pixel_values, want["pixel_values"])
    assert got.num_tokens == ref.get_number_of_image_patches(h, w) // 4


def test_image_modes_and_sources_equal_transformers(tmp_path):
    """Transparency is composited onto white, grey images become RGB, paths read the same."""
    ref = reference_image_processor(P.IMAGE_MIN_PIXELS, P.IMAGE_MAX_PIXELS)
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (45, 70, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (50, 61), dtype=np.uint8), "L")
    grey.save(tmp_path / "grey.png")
    for image, source in ((rgba, rgba), (grey, tmp_path / "grey.png")):
        want = ref(images=[image], return_tensors="pt")["pixel_values"]
        assert torch.equal(P.process_image(source).pixel_values, want)


def test_smart_resize_equals_transformers():
    ref = reference_video_function("smart_resize")
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(1, 3000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo, hi = sorted(int(v) for v in rng.integers(28 * 28, 4000 * 28 * 28, 2))
        assert P.smart_resize(h, w, 28, lo, hi) == ref(h, w, 28, lo, hi)
    with pytest.raises(VeridraftError, match="aspect ratio"):
        P.smart_resize(10, 2500)


def test_video_patch_layout_equals_transformers_video_processor():
    ref_patchify = reference_video_function("patchify")
    rng = np.random.default_rng(1)
    for n in (2, 4, 5):  # 5: the last frame is repeated to fill the temporal patch
        frames = rng.standard_normal((n, 3, 56, 84)).astype(np.float32)
        want, *grid = ref_patchify(None, torch.from_numpy(frames)[None], 14, 2, 2)
        rows, got_grid = P.patchify(frames)
        assert list(got_grid) == grid
        assert torch.equal(torch.from_numpy(rows), want[0])


def test_two_identical_frames_give_the_image_rows():
    image = random_image(97, 131, seed=5)
    img = P.process_image(image, min_pixels=P.VIDEO_MIN_PIXELS, max_pixels=P.VIDEO_MAX_PIXELS)
    vid = P.process_video([image, image], max_pixels=P.VIDEO_MAX_PIXELS)
    assert vid.grid_thw == img.grid_thw and vid.num_tokens == img.num_tokens
    assert torch.equal(vid.pixel_values, img.pixel_values)


def frame_rows_match_images(vid: P.VisionInput, frames, min_pixels: int, max_pixels: int):
    """Each frame of a video's temporal patches equals transformers' image processor rows of
    that frame (resized with the same limits)."""
    ref = reference_image_processor(min_pixels, max_pixels)
    t, h, w = vid.grid_thw
    rows = vid.pixel_values.view(t, h * w, 3, 2, 14 * 14)
    for i, frame in enumerate(frames):
        want = ref(images=[Image.fromarray(frame)], return_tensors="pt")
        assert want["image_grid_thw"][0].tolist() == [1, h, w]
        per_frame = want["pixel_values"].view(h * w, 3, 2, 14 * 14)[:, :, 0]
        assert torch.equal(rows[i // 2, :, :, i % 2], per_frame), f"frame {i}"


def test_video_from_frames_equals_transformers_per_frame():
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (4, 151, 209, 3), dtype=np.uint8)
    vid = P.process_video(list(frames), min_pixels=64 * 28 * 28, max_pixels=96 * 28 * 28)
    assert vid.grid_thw[0] == 2 and vid.second_per_grid == 1.0  # 2 frames a grid at 2 fps
    frame_rows_match_images(vid, frames, 64 * 28 * 28, 96 * 28 * 28)


def write_png_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """A lossless (PNG-coded) video, so decoded frames equal what was written."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("png", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())


def test_generated_video_decodes_the_sampled_frames(tmp_path):
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, (30, 64, 90, 3), dtype=np.uint8)
    path = tmp_path / "clip.mov"
    write_png_video(path, frames, fps=10)
    assert P.video_info(path) == (30, 10.0)
    count = P.sample_frame_count(30, 10.0, fps=2.0)  # 3 s at 2 fps
    indices = P.sample_frame_indices(30, count)
    assert count == 6 and indices == [0, 6, 12, 17, 23, 29]
    assert np.array_equal(P.read_frames(path, indices), frames[indices])
    vid = P.process_content({"type": "video", "video": str(path), "fps": 2.0})
    assert vid.grid_thw[0] == 3 and vid.second_per_grid == pytest.approx(1.0)
    want = P.process_video(list(frames[indices]), fps=2.0)
    assert torch.equal(vid.pixel_values, want.pixel_values)


def test_real_video_equals_transformers_decoding_and_processing(sample_video):
    """A real H.264 file: PyAV frames equal transformers' PyAV loader at the same indices, and
    every processed frame equals transformers' image processor under the video pixel limits."""
    from transformers.video_utils import read_video_pyav

    total, fps = P.video_info(sample_video)
    assert (total, round(fps, 2)) == (120, 29.97)
    count = P.sample_frame_count(total, fps, fps=2.0)
    indices = P.sample_frame_indices(total, count)
    assert count == 8 and indices == np.linspace(0, 119, 8).round().astype(int).tolist()

    want, meta = read_video_pyav(str(sample_video), lambda metadata, **_: np.array(indices))
    got = P.read_frames(sample_video, indices)
    assert meta.total_num_frames == total and np.array_equal(got, want)

    message = {"type": "video", "video": f"file://{sample_video}", "fps": 2.0}
    vid = P.process_messages(
        [{"role": "user", "content": [message, {"type": "text", "text": "?"}]}]
    )[0]
    # 176x144 is below the 128-token floor: upscaled to 364x308, 4 temporal patches.
    assert vid.grid_thw == (4, 22, 26) and vid.num_tokens == 4 * 22 * 26 // 4
    assert vid.second_per_grid == pytest.approx(2 / (8 / 120 * fps))
    cap = max(min(P.VIDEO_MAX_PIXELS, P.VIDEO_TOTAL_PIXELS / 8 * 2), int(P.VIDEO_MIN_PIXELS * 1.05))
    frame_rows_match_images(vid, got, P.VIDEO_MIN_PIXELS, int(cap))

    small = P.process_content(
        {**message, "nframes": 4, "fps": None, "max_pixels": 100 * 28 * 28, "min_pixels": 28 * 28}
    )
    assert small.grid_thw == (2, 10, 12)  # 176x144 kept near size: 168x140


def test_pixel_budget_and_requested_sizes():
    """The total budget caps every frame and a larger max_pixels cannot lift that cap; a
    requested size is rounded to multiples of 28 (qwen-vl-utils' rules)."""
    frames = [random_image(280, 280, seed=i) for i in range(4)]
    budget = dict(min_pixels=28 * 28, total_pixels=50 * 28 * 28)  # 25 tokens' pixels a frame
    for max_pixels in (None, 100 * 28 * 28):
        assert P.process_video(frames, max_pixels=max_pixels, **budget).grid_thw == (2, 10, 10)
    assert P.process_video(frames, max_pixels=9 * 28 * 28, **budget).grid_thw == (2, 6, 6)
    sized = P.process_content({"image": frames[0], "resized_height": 100, "resized_width": 150})
    assert sized.grid_thw == (1, 8, 10)


def test_frame_count_rules():
    assert P.sample_frame_count(120, 30000 / 1001, fps=2.0) == 8
    assert P.sample_frame_count(120, 30.0, nframes=7) == 8  # rounded to the temporal patch
    assert P.sample_frame_count(300, 30.0, fps=0.1) == 4  # at least 4 frames
    assert P.sample_frame_count(11, 30.0, fps=60.0) == 10  # at most all frames, floored to 2
    assert P.sample_frame_count(100_000, 30.0, fps=30.0) == 768
    with pytest.raises(VeridraftError, match="either fps or nframes"):
        P.sample_frame_count(100, 30.0, fps=2.0, nframes=4)
    with pytest.raises(VeridraftError, match="cannot sample"):
        P.sample_frame_count(100, 30.0, nframes=200)


def test_chat_text_and_pad_expansion():
    image = random_image(56, 84)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "video", "video": [image] * 3, "min_pixels": 784, "max_pixels": 56 * 84},
                {"type": "text", "text": "What changed?"},
            ],
        }
    ]
    text = P.chat_text(messages)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        "What changed?<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = P.process_messages(messages)
    assert [(v.kind, v.grid_thw, v.num_tokens) for v in inputs] == [
        ("image", (1, 4, 6), 6),
        ("video", (2, 4, 6), 12),
    ]
    expanded = P.expand_vision_pads(text, inputs)
    assert expanded.count(P.IMAGE_PAD) == 6 and expanded.count(P.VIDEO_PAD) == 12
    assert P.VISION_START + P.IMAGE_PAD * 6 + P.VISION_END in expanded
    with pytest.raises(VeridraftError, match="1 <\\|image_pad\\|> tokens but 0 images"):
        P.expand_vision_pads(text, inputs[1:])


def test_bad_inputs_name_the_fix(tmp_path):
    with pytest.raises(VeridraftError, match="does not exist"):
        P.process_content({"type": "video", "video": str(tmp_path / "missing.mp4")})
    with pytest.raises(VeridraftError, match="URL"):
        P.process_content({"type": "image", "image": "https://example.com/cat.png"})
    with pytest.raises(VeridraftError, match="unknown content type"):
        P.process_content({"type": "audio", "audio": "x.wav"})
