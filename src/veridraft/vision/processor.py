"""Qwen2-VL / Qwen2.5-VL image and video preprocessing, from chat messages to patch rows.

An image or a sampled video becomes a `VisionInput`: float32 rows of
`channels * temporal_patch_size * patch_size**2` values (1176 for the released models) in the
order the vision tower's patch embedding reads them, its `(t, h, w)` patch grid, and the number
of LLM tokens it turns into after the 2x2 merge. The behaviour matches transformers'
`Qwen2VLImageProcessor` (PIL backend) for images and the qwen-vl-utils rules that
`process_vision_info` applies to `{"type": "video", ...}` messages for videos: frame count from
`fps` or `nframes` rounded to the temporal patch size, `linspace` frame indices, a per-frame
pixel budget from `total_pixels`, `smart_resize` to multiples of 28.

Frames are resized with PIL's bicubic filter (as transformers' PIL image processor does);
the torchvision resize of the reference video path is not used because CPU-only machines often
cannot load torchvision at all, so videos and images share one resize. Videos are decoded with
PyAV (`av`): its wheels bundle a current FFmpeg, it needs no system libraries, and it exposes
the stream's frame count and average rate that frame sampling and `second_per_grid_ts` need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veridraft.errors import VeridraftError

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: one LLM token per 28x28 pixels (per 2 frames)

# The released preprocessor configs (and transformers' Qwen2VLImageProcessor when given them).
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 16384 * 28 * 28
# qwen-vl-utils' video limits; the total budget is transformers' `max_video_tokens` cap.
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768
MAX_ASPECT_RATIO = 200

# CLIP normalisation (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD in transformers).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Token ids of the released Qwen2-VL / Qwen2.5-VL tokenizers (config defaults).
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656


@dataclass
class VisionInput:
    """One image or video ready for the vision tower.

    `pixel_values` is `[t*h*w, C*temporal*patch*patch]` float32 (transformers' `pixel_values` /
    `pixel_values_videos` rows for this item), `grid_thw` its patch grid (`image_grid_thw` /
    `video_grid_thw` row). `second_per_grid` is the seconds one temporal patch spans (a video's
    `second_per_grid_ts` entry), None for images.
    """

    kind: str  # "image" or "video"
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    second_per_grid: float | None = None
    merge_size: int = MERGE_SIZE

    @property
    def num_tokens(self) -> int:
        """LLM tokens after the spatial merge: the number of pad tokens this item expands to."""
        t, h, w = self.grid_thw
        return t * h * w // (self.merge_size**2)

    @property
    def pad_token(self) -> str:
        return IMAGE_PAD if self.kind == "image" else VIDEO_PAD


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as rounding allows. Matches `smart_resize` in transformers'
    Qwen2-VL processors and in qwen-vl-utils."""
    if min(height, width) <= 0:
        raise VeridraftError(f"image of size {width}x{height} is empty; pass a non-empty image")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise VeridraftError(
            f"image of size {width}x{height} has an aspect ratio above {MAX_ASPECT_RATIO}; "
            "crop or pad it first"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(image: Any) -> np.ndarray:
    """A path, PIL image or HxWx3 uint8 array as an RGB uint8 array (H, W, 3)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise VeridraftError(
                f"image array of shape {image.shape} and dtype {image.dtype} is not RGB uint8; "
                "pass an (H, W, 3) uint8 array or a PIL image"
            )
        return image
    if isinstance(image, str | Path):
        if not Path(image).is_file():
            raise VeridraftError(f"image file {image} does not exist; pass a path to an image file")
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        raise VeridraftError(
            f"cannot read an image from a {type(image).__name__}; pass a path, PIL image or array"
        )
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # Transparency is composited onto white, as transformers and qwen-vl-utils do.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB") if image.mode != "RGB" else image)


def resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of an RGB uint8 frame with PIL (what transformers' PIL backend does)."""
    if frame.shape[0] == height and frame.shape[1] == width:
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))


def normalize(frames: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W), scaled to [0, 1] and CLIP-normalised.

    The arithmetic follows transformers' rescale (float64 multiply by 1/255, then float32) and
    normalize (float32 subtract and divide), so values are bitwise equal to its output.
    """
    x = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(IMAGE_MEAN, dtype=np.float32)) / np.array(IMAGE_STD, dtype=np.float32)
    return np.moveaxis(x, -1, -3)


def patchify(
    frames: np.ndarray,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32 frames (T, C, H, W) -> rows (grid_t*grid_h*grid_w, C*temporal*patch*patch), grid.

    Rows are ordered (t, h-block, w-block, h-in-block, w-in-block) so each 2x2 merge group is
    contiguous (the merger concatenates 4 consecutive rows); a row holds (C, temporal, py, px).
    A frame count that is not a multiple of the temporal patch repeats the last frame, as the
    reference video processor does.
    """
    n, c, height, width = frames.shape
    if height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise VeridraftError(
            f"frame size {width}x{height} is not a multiple of {patch_size * merge_size}; "
            "resize with smart_resize first"
        )
    if pad := -n % temporal_patch_size:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        n += pad
    gt, gh, gw = n // temporal_patch_size, height // patch_size, width // patch_size
    x = frames.reshape(
        gt,
        temporal_patch_size,
        c,
        gh // merge_size,
        merge_size,
        patch_size,
        gw // merge_size,
        merge_size,
        patch_size,
    )
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    return np.ascontiguousarray(rows), (gt, gh, gw)


def process_image(
    image: Any,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
    resized_height: int | None = None,
    resized_width: int | None = None,
) -> VisionInput:
    """One image -> VisionInput with grid (1, h, w): the frame is repeated over the temporal
    patch, as transformers' Qwen2VLImageProcessor does."""
    frame = load_image(image)
    if resized_height and resized_width:
        height, width = smart_resize(resized_height, resized_width)
    else:
        height, width = smart_resize(frame.shape[0], frame.shape[1], FACTOR, min_pixels, max_pixels)
    x = normalize(resize(frame, height, width))[None]
    rows, grid = patchify(np.repeat(x, TEMPORAL_PATCH_SIZE, axis=0))
    return VisionInput("image", torch.from_numpy(rows), grid)


def sample_frame_count(
    total_frames: int,
    video_fps: float,
    fps: float | None = None,
    nframes: int | None = None,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
    factor: int = TEMPORAL_PATCH_SIZE,
) -> int:
    """How many frames to sample: qwen-vl-utils' `smart_nframes`.

    `nframes` is rounded to a multiple of `factor`; otherwise `total/video_fps*fps` (fps default
    2) is clamped to [min_frames, min(max_frames, total)] and floored to a multiple of `factor`.
    """
    if fps is not None and nframes is not None:
        raise VeridraftError("a video takes either fps or nframes, not both; drop one of them")
    if nframes is not None:
        count = round(nframes / factor) * factor
    else:
        fps = VIDEO_FPS if fps is None else fps
        lo = math.ceil(min_frames / factor) * factor
        hi = math.floor(min(max_frames, total_frames) / factor) * factor
        count = total_frames / video_fps * fps
        count = min(min(max(count, lo), hi), total_frames)
        count = math.floor(count / factor) * factor
    if not factor <= count <= total_frames:
        raise VeridraftError(
            f"cannot sample {count} frames from a video of {total_frames}; "
            f"pass nframes between {factor} and {total_frames}"
        )
    return int(count)


def sample_frame_indices(total_frames: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over [0, total_frames-1], both ends included
    (qwen-vl-utils: `linspace(0, total-1, n).round()`)."""
    return torch.linspace(0, total_frames - 1, count).round().long().tolist()


def video_info(path: str | Path) -> tuple[int, float]:
    """(frame count, average frame rate) of a video file's first video stream, read with PyAV.

    Containers that do not record a frame count are counted by demuxing (no decoding).
    """
    av = _import_av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VeridraftError(f"{path} has no video stream; pass a video file")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        total = stream.frames
        if not total:
            total = sum(1 for p in container.demux(stream) if p.size)
    if not total or not rate:
        raise VeridraftError(f"{path} reports no frames or no frame rate; re-encode the video")
    return int(total), float(rate)


def read_frames(path: str | Path, indices: Sequence[int]) -> np.ndarray:
    """Decode the frames at `indices` (in decode order) as RGB uint8 (n, H, W, 3) with PyAV."""
    av = _import_av()
    wanted = set(indices)
    last = max(wanted)
    got: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i > last:
                break
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
    missing = [i for i in wanted if i not in got]
    if missing:
        raise VeridraftError(
            f"{path} decoded fewer frames than its header reports (frame {missing[0]} is missing); "
            "re-encode the video or pass nframes"
        )
    return np.stack([got[i] for i in indices])


def process_video(
    video: Any,
    fps: float | None = None,
    nframes: int | None = None,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int | None = None,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
    resized_height: int | None = None,
    resized_width: int | None = None,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
) -> VisionInput:
    """A video file (or a list of frames) -> VisionInput with grid (frames/2, h, w).

    A file is sampled with `sample_frame_count` / `sample_frame_indices`; a list of frames is
    used as given (rounded up to the temporal patch by repeating the last frame) and taken to be
    sampled at `fps` (default 2). The per-frame pixel cap is qwen-vl-utils':
    `max(min(VIDEO_MAX_PIXELS, total_pixels / frames * 2), 1.05 * min_pixels)`, lowered to
    `max_pixels` when that is smaller. `resized_height` / `resized_width` ask for a size instead
    (rounded to multiples of 28). `second_per_grid` = temporal patch / sampled frame rate.
    """
    if isinstance(video, str | Path):
        if not Path(video).is_file():
            raise VeridraftError(f"video file {video} does not exist; pass a path to a video file")
        total, video_fps = video_info(video)
        count = sample_frame_count(total, video_fps, fps, nframes, min_frames, max_frames)
        frames = read_frames(video, sample_frame_indices(total, count))
        sample_fps = count / total * video_fps
    elif isinstance(video, Sequence) and len(video) > 0:
        frames = np.stack([load_image(f) for f in video])
        if pad := -len(frames) % TEMPORAL_PATCH_SIZE:
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        sample_fps = VIDEO_FPS if fps is None else fps
    else:
        raise VeridraftError(
            f"cannot read a video from a {type(video).__name__}; pass a file path or a list of frames"
        )
    if resized_height and resized_width:
        height, width = smart_resize(resized_height, resized_width)
    else:
        budget = total_pixels / len(frames) * TEMPORAL_PATCH_SIZE
        cap = max(min(VIDEO_MAX_PIXELS, budget), int(min_pixels * 1.05))
        # A given max_pixels can lower the per-frame cap, never raise it (qwen-vl-utils).
        cap = cap if max_pixels is None else min(max_pixels, cap)
        height, width = smart_resize(frames.shape[1], frames.shape[2], FACTOR, min_pixels, int(cap))
    # Frame by frame: normalize's float64 step on a whole long video would double its memory.
    x = np.stack([normalize(resize(f, height, width)) for f in frames])
    rows, grid = patchify(x)
    return VisionInput("video", torch.from_numpy(rows), grid, TEMPORAL_PATCH_SIZE / sample_fps)


VIDEO_KEYS = (
    "fps",
    "nframes",
    "min_pixels",
    "max_pixels",
    "total_pixels",
    "min_frames",
    "max_frames",
    "resized_height",
    "resized_width",
)
IMAGE_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")


def process_content(item: dict[str, Any]) -> VisionInput | None:
    """One content entry of a chat message -> VisionInput, or None for text entries.

    Accepts the shapes transformers' processors and qwen-vl-utils take:
    `{"type": "image", "image": PATH_OR_PIL}` (also `"url"`/`"path"` keys) and
    `{"type": "video", "video": PATH_OR_FRAMES, "fps": 2.0, "max_pixels": ..., "nframes": ...}`.
    """
    kind = item.get("type")
    if kind is None:
        kind = "image" if "image" in item else "video" if "video" in item else "text"
    if kind == "text":
        return None
    if kind not in ("image", "video"):
        raise VeridraftError(f"unknown content type {kind!r}; use 'text', 'image' or 'video'")
    source = item.get(kind, item.get("path", item.get("url")))
    if isinstance(source, str) and source.startswith("file://"):
        source = source[len("file://") :]
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise VeridraftError(f"{kind} {source} is a URL; download it and pass the local path")
    keys = IMAGE_KEYS if kind == "image" else VIDEO_KEYS
    options = {k: item[k] for k in keys if item.get(k) is not None}
    return process_image(source, **options) if kind == "image" else process_video(source, **options)


def process_messages(messages: Sequence[dict[str, Any]]) -> list[VisionInput]:
    """Every image and video in a chat, in order of appearance."""
    found = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            found += [v for item in content if (v := process_content(item)) is not None]
    return found


def chat_text(
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    add_vision_id: bool = False,
) -> str:
    """The Qwen2-VL chat template (the one the released tokenizers ship), one pad per item:
    a default system turn, `<|im_start|>role\\n...<|im_end|>\\n`, and
    `<|vision_start|><|image_pad|><|vision_end|>` (or `<|video_pad|>`) where media appear."""
    out = []
    images = videos = 0
    for i, message in enumerate(messages):
        if i == 0 and message["role"] != "system":
            out.append("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
        out.append(f"<|im_start|>{message['role']}\n")
        content = message["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            for item in content:
                kind = item.get("type")
                if kind == "image" or "image" in item or "image_url" in item:
                    images += 1
                    out.append(f"Picture {images}: " if add_vision_id else "")
                    out.append(VISION_START + IMAGE_PAD + VISION_END)
                elif kind == "video" or "video" in item:
                    videos += 1
                    out.append(f"Video {videos}: " if add_vision_id else "")
                    out.append(VISION_START + VIDEO_PAD + VISION_END)
                elif "text" in item:
                    out.append(item["text"])
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def expand_vision_pads(text: str, inputs: Sequence[VisionInput]) -> str:
    """Replace the n-th `<|image_pad|>` / `<|video_pad|>` with `num_tokens` copies of itself,
    taking images and videos in order (what transformers' Qwen2-VL processor does)."""
    queues = {
        IMAGE_PAD: [v for v in inputs if v.kind == "image"],
        VIDEO_PAD: [v for v in inputs if v.kind == "video"],
    }
    for pad, items in queues.items():
        parts = text.split(pad)
        if len(parts) - 1 != len(items):
            raise VeridraftError(
                f"the text has {len(parts) - 1} {pad} tokens but {len(items)} "
                f"{'images' if pad == IMAGE_PAD else 'videos'} were given; give one per pad"
            )
        text = parts[0] + "".join(pad * v.num_tokens + rest for v, rest in zip(items, parts[1:]))
    return text


def _import_av():
    try:
        import av
    except ImportError as e:
        raise VeridraftError(
            "video input needs PyAV; install it with: pip install 'veridraft[video]'"
        ) from e
    return av
