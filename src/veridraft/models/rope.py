"""Rotary position embeddings: the cos/sin tables (bitwise transformers' own) and their use."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def inv_freq(p: dict[str, Any], head_dim: int) -> Tensor:
    """The inverse frequencies [head_dim / 2] of one rope setting (default, linear, llama3; M-RoPE
    ("mrope") uses the default frequencies, split over three position streams elsewhere)."""
    # same expression as transformers so the tables match it bit for bit
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv = 1.0 / (float(p["rope_theta"]) ** exps)
    if p["rope_type"] == "linear":
        inv = inv / p["factor"]
    elif p["rope_type"] == "llama3":
        factor, lo_f, hi_f = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo_f, inv / factor, inv)
        smooth = (old / wavelen - lo_f) / (hi_f - lo_f)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi_f) * ~(wavelen > old / lo_f)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class RopeTables:
    """cos/sin per position for each distinct rope setting, grown on demand (a 262k-position
    table for every Gemma theta would cost hundreds of MB that short contexts never touch)."""

    def __init__(self, params: list[dict[str, Any]], head_dim: int) -> None:
        with torch.device("cpu"):  # real tensors even when the model is built on "meta"
            self.inv_freq = [inv_freq(p, head_dim) for p in params]
            self.cos: list[Tensor] = [torch.empty(0, 1, head_dim) for _ in params]
            self.sin: list[Tensor] = [torch.empty(0, 1, head_dim) for _ in params]

    def ensure(self, n: int) -> None:
        if n <= self.cos[0].shape[0]:
            return
        n = max(n, 2 * self.cos[0].shape[0], 256)
        pos = torch.arange(n, dtype=torch.int64).float()
        for j, inv in enumerate(self.inv_freq):
            freqs = pos[:, None] * inv[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
            # sin with rotate_half's sign folded in: rotate_half(x) * sin == roll(x) * sin'
            sin = emb.sin()
            half = sin.shape[-1] // 2
            sin[..., :half].neg_()
            self.cos[j], self.sin[j] = emb.cos(), sin

    def get(self, j: int, start: int, t: int) -> tuple[Tensor, Tensor]:
        """cos, signed sin [T, 1, hd] for positions start..start+t (see apply_rope)."""
        self.ensure(start + t)
        return self.cos[j][start : start + t], self.sin[j][start : start + t]

    def at(self, j: int, pos: Tensor) -> tuple[Tensor, Tensor]:
        """cos, signed sin [T, 1, hd] for arbitrary positions (a token tree's start + depth)."""
        self.ensure(int(pos.max()) + 1)
        return self.cos[j][pos], self.sin[j][pos]


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x [T, heads, hd] in the HF half-split layout (q and k rotated in one call):
    x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) = roll(x) * (-1, 1); the
    sign lives in the table, so this is three kernels instead of seven."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)
