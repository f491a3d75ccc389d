"""AdaKV (Feng et al., 2024), lossy: head-wise budgets. Per layer, all KV heads' SnapKV scores
(window 32, max pooling, kernel 7) compete for H * B slots; head h wins c_h of them and keeps
round(c_h * (1 - alpha) + alpha * B) (alpha = 0.5, a floor so no head starves) plus the window.
The layer's total is exactly H * budget; heads differ. Unlike kvpress's masking version the
evicted rows are gone: the compacted cache stores each head's rows only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache import KVCache
from ..models.base import Capture
from .base import Press, split_exact, to_float, window_select
from .snapkv import snap_options


@dataclass
class AdaKVPress(Press):
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    alpha: float = 0.5
    name = "adakv"
    params = ("budget", "window", "kernel", "pooling", "alpha")

    @classmethod
    def options(cls, params: dict[str, str]) -> dict:
        return {
            **snap_options(cls.name, params, "7", "max"),
            "alpha": to_float(params.get("alpha", "0.5"), cls.name, "alpha", 0.0, 1.0),
        }

    def capture(self) -> Capture:
        return Capture(press_rows=self.window)

    def select(self, net, cache: KVCache, cap: Capture) -> list[list[Tensor]]:
        return window_select(
            cache, cap, self.budget, self.window, self.kernel, self.pooling, self.head_budgets
        )

    def head_budgets(self, layer: int, s: Tensor, b: int, w: int) -> list[int]:
        """The layer's H * (b - w) non-window slots, split over its KV heads by the scores."""
        n_kv, per = len(s), b - w
        won = torch.zeros(n_kv)
        if per > 0:
            flat = s.flatten().topk(n_kv * per).indices
            won = torch.bincount(flat // s.shape[1], minlength=n_kv).float()
        want = won * (1 - self.alpha) + self.alpha * per
        return split_exact(want, n_kv * per, cap=s.shape[1])
