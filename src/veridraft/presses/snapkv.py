"""SnapKV (Li et al., 2024), lossy: the last `window` prompt queries vote for the positions
they attend to; per KV head keep the top (budget - window) pooled scores plus the window.
Prefill only; nothing is evicted while decoding. Defaults follow the reference code
(window 32, kernel 5, average pooling); GQA scores are the group mean (as kvpress)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..cache import KVCache
from ..errors import VeridraftError
from ..models.base import Capture
from .base import Press, to_int, window_select


def snap_options(name: str, params: dict[str, str], kernel: str, pooling: str) -> dict:
    pooling = params.get("pooling", pooling)
    if pooling not in ("avg", "max"):
        raise VeridraftError(f"{name}: pooling must be avg or max, got {pooling!r}")
    return {
        "window": to_int(params.get("window", "32"), name, "window", 1),
        "kernel": to_int(params.get("kernel", kernel), name, "kernel", 1),
        "pooling": pooling,
    }


@dataclass
class SnapKVPress(Press):
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"
    name = "snapkv"
    params = ("budget", "window", "kernel", "pooling")

    @classmethod
    def options(cls, params: dict[str, str]) -> dict:
        return snap_options(cls.name, params, "5", "avg")

    def capture(self) -> Capture:
        return Capture(press_rows=self.window)

    def select(self, net, cache: KVCache, cap: Capture) -> list[list[Tensor]]:
        def kept(layer: int, s: Tensor, b: int, w: int) -> list[int]:
            return [b - w] * len(s)

        return window_select(cache, cap, self.budget, self.window, self.kernel, self.pooling, kept)
