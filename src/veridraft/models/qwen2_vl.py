"""Qwen2-VL / Qwen2.5-VL: the Qwen2 text decoder with M-RoPE, fed vision embeddings.

The decoder is Llama's block with Qwen2's q/k/v biases (models/llama.py); two things differ:

- Positions. Every token has three rotary positions (t, h, w), and each frequency pair of a
  head rotates by one of them (`mrope_section` pairs for t, then h, then w). Text tokens have
  the same number on all three, so their rotation is plain RoPE. A prompt's positions come from
  `vision.positions.rope_index`; after the prompt, cache slot n runs at position n + delta on
  every stream (delta = the prompt's largest position + 1 - its length, usually negative: a
  256-token image advances positions by 16). The cache keeps slots, not positions: drafters,
  token trees and compacted caches address slot n and get its position from `MRopeTables`.
- Embeddings. The prompt's image and video pad tokens take the vision tower's outputs instead
  of the pad token's embedding row (transformers' masked_scatter of the image features).

Both come from the `VisionPrompt` set on the model (`with net.use_prompt(vp): ...`); without one
the model is a text model whose positions are its slots, which is what Qwen2-VL computes for a
text-only prompt. The vision tower (vision/encoder.py) stays in float32 torch in every mode;
the decoder runs in veridraft's modes: fp32, fp16w and bf16 from an HF folder or a GGUF + mmproj
pair, q4 and q4a8 from the pair's GGUF (models/mmproj.py reads the pair).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import VeridraftError
from .config import FULL, SLIDING, ModelConfig
from .llama import Llama
from .rope import RopeTables

_VISION_PREFIXES = ("visual.", "model.visual.")


@dataclass
class VisionPrompt:
    """A multimodal prompt as the decoder reads it.

    ids [L] the prompt ids (pads expanded); positions [3, L] their M-RoPE positions; delta the
    rope offset of every slot after the prompt; embeds [N, dim] float32 the vision tower's rows
    for the N pad tokens in prompt order; rows [L] which row of embeds each slot takes (-1: its
    own embedding)."""

    ids: Tensor
    positions: Tensor
    delta: int
    embeds: Tensor
    rows: Tensor

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


class MRopeTables(RopeTables):
    """RoPE tables addressed by cache slot: a prompt slot gets its three-stream rotation from
    the prompt's positions, a later slot n the plain rotation at n + delta.

    The multimodal rows are gathered from the plain tables (element [i, d] = the plain table at
    the position of d's stream), so they are bitwise the cos/sin transformers computes: the
    same float32 products, only picked per frequency pair."""

    def __init__(self, params: list[dict[str, Any]], head_dim: int, section: list[int]) -> None:
        super().__init__(params, head_dim)
        with torch.device("cpu"):
            pairs = torch.repeat_interleave(torch.arange(3), torch.tensor(section))
            self.stream = torch.cat((pairs, pairs))  # [head_dim]: the stream of each column
        self.prompt: VisionPrompt | None = None

    @property
    def delta(self) -> int:
        return self.prompt.delta if self.prompt is not None else 0

    def positions(self, slots: Tensor) -> Tensor:
        """[3, T] positions of cache slots [T]."""
        pos = (slots + self.delta).expand(3, -1).clone()
        vp = self.prompt
        if vp is not None:
            inside = slots < vp.length
            if bool(inside.any()):
                pos[:, inside] = vp.positions[:, slots[inside]]
        return pos

    def _rows(self, j: int, pos: Tensor) -> tuple[Tensor, Tensor]:
        self.ensure(int(pos.max()) + 1)
        idx = pos[self.stream].T  # [T, head_dim]
        cos = self.cos[j][:, 0].gather(0, idx)[:, None]
        sin = self.sin[j][:, 0].gather(0, idx)[:, None]
        return cos, sin

    def get(self, j: int, start: int, t: int) -> tuple[Tensor, Tensor]:
        vp = self.prompt
        if vp is None or start >= vp.length:  # text after the prompt: one slice of the table
            return super().get(j, start + self.delta, t)
        return self._rows(j, self.positions(torch.arange(start, start + t)))

    def at(self, j: int, pos: Tensor) -> tuple[Tensor, Tensor]:
        vp = self.prompt
        if vp is None or int(pos.min()) >= vp.length:
            return super().at(j, pos + self.delta)
        return self._rows(j, self.positions(pos))


class Qwen2VL(Llama):
    """The language model of Qwen2-VL / Qwen2.5-VL, plus its vision tower's weights."""

    multimodal = True

    def __init__(self, config: ModelConfig, precision: str = "fp32") -> None:
        super().__init__(config, precision)
        if config.mrope_section is None:
            raise VeridraftError(
                f"{config.model_type} config lacks rope mrope_section; re-convert the model"
            )
        settings = [config.rope[FULL]]
        if config.rope[SLIDING] != config.rope[FULL]:
            settings.append(config.rope[SLIDING])
        self.rope = MRopeTables(settings, config.head_dim, config.mrope_section)
        self.vision_weights: dict[str, Tensor] = {}
        self._slot = 0  # the cache slot of the current forward's first row (embed reads it)
        # Where text resumes inside a prompt after a video (vision.positions.rope_index): "max"
        # as the released models were trained, "spatial" as transformers 5 computes it.
        self.text_after_vision = "max"
        ids = self.token_ids
        self._pads = (ids["image"], ids["video"])

    # -- vision --

    @property
    def vision_config(self):
        from ..vision.encoder import VisionConfig

        return VisionConfig.from_hf(self.config.vision or {})

    @property
    def token_ids(self) -> dict[str, int]:
        """The image pad, video pad and vision start ids of this checkpoint."""
        v = self.config.vision or {}
        return {
            "image": int(v.get("image_token_id", 151655)),
            "video": int(v.get("video_token_id", 151656)),
            "vision_start": int(v.get("vision_start_token_id", 151652)),
        }

    @property
    def prompt(self) -> VisionPrompt | None:
        return self.rope.prompt

    @contextmanager
    def use_prompt(self, vp: VisionPrompt | None) -> Iterator[None]:
        """Forwards inside the block read `vp`'s positions and vision embeddings."""
        old = self.rope.prompt
        self.rope.prompt = vp
        try:
            yield
        finally:
            self.rope.prompt = old

    # -- forward --

    def forward(self, tokens: Tensor, cache, **kw) -> Tensor:
        self._slot = cache.length
        return super().forward(tokens, cache, **kw)

    def embed(self, tokens: Tensor) -> Tensor:
        x = super().embed(tokens)
        vp = self.rope.prompt
        a = self._slot
        if vp is None and a == 0:
            pads = (tokens == self._pads[0]) | (tokens == self._pads[1])
            if bool(pads.any()):
                raise VeridraftError(
                    "the prompt holds image/video pad tokens but no images or video were given; "
                    "generate from the chat messages with veridraft.generate "
                    "(or veridraft.multimodal.generate)"
                )
        if vp is None or a >= vp.length:
            return x
        b = min(a + tokens.shape[0], vp.length)
        if not torch.equal(tokens[: b - a], vp.ids[a:b]):
            raise VeridraftError(
                "the ids run at the prompt's cache slots are not the multimodal prompt set on "
                "the model; run the prompt use_prompt() was given, or leave its block first"
            )
        rows = vp.rows[a:b]
        mask = rows >= 0
        if bool(mask.any()):
            x[: b - a][mask] = vp.embeds[rows[mask]].to(x.dtype)
        return x

    # -- loading --

    def load_hf(self, sd: Mapping[str, Tensor], source: str) -> None:
        super().load_hf(sd, source)
        from ..vision.encoder import load_vision_weights

        # the packed modes hand over a view whose linear weights are not read (their "proj"
        # names match the tower's MLP too): the tower is float32, read from the checkpoint
        raw = getattr(sd, "sd", sd)
        names = [k for k in raw if k.startswith(_VISION_PREFIXES)]
        tensors = {k: raw[k] for k in names}
        self.vision_weights = {
            k: v.float() for k, v in load_vision_weights(tensors, self.vision_config).items()
        }
