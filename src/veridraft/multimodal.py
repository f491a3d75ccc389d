"""Generation from chat messages with images and videos (Qwen2-VL / Qwen2.5-VL models).

out = veridraft.generate(model, [{"role": "user", "content": [
    {"type": "video", "video": "clip.mp4", "fps": 2.0},
    {"type": "text", "text": "What happens in this video?"}]}], draft="pruned")

`veridraft.generate` runs messages that hold an image or a video through `generate` here (the
same call, for messages only).

vision/chat.py prepares the prompt (media through the processor and the vision tower, M-RoPE
positions, "video"/"image"/"question" segments); decoding is `generate_ids` with the model's
VisionPrompt active, so every method runs on it as on a text prompt. The functions live in
generate.py, beside the `generate` that routes to them (an import either way would be a cycle).
"""

from __future__ import annotations

from .generate import generate_media as generate
from .generate import generate_prompt

__all__ = ["generate", "generate_prompt"]
