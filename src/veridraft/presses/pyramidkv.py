"""PyramidKV (Cai et al., 2024), lossy: SnapKV scoring with per-layer budgets shaped like a
pyramid, more in the lower layers. With B = budget - window and L layers (reference code):
min = B // beta, max = 2B - min (capped at the prompt), budget_l = max - l * ((max - min) //
(L - 1)), plus the window. The floor makes the mean budget at most the given one."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..cache import KVCache
from ..models.base import Capture
from .base import Press, to_int, window_select
from .snapkv import snap_options


def layer_budgets(b: int, window: int, prompt_len: int, n_layers: int, beta: int) -> list[int]:
    """Non-window tokens kept per layer."""
    avg = b - window
    lo = avg // beta
    hi = 2 * avg - lo
    if hi >= prompt_len - window:
        hi = prompt_len - window
        lo = 2 * avg - hi
    step = (hi - lo) // (n_layers - 1) if n_layers > 1 else 0
    return [hi - layer * step for layer in range(n_layers)]


@dataclass
class PyramidKVPress(Press):
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"
    beta: int = 20
    name = "pyramidkv"
    params = ("budget", "window", "kernel", "pooling", "beta")

    @classmethod
    def options(cls, params: dict[str, str]) -> dict:
        return {
            **snap_options(cls.name, params, "5", "avg"),
            "beta": to_int(params.get("beta", "20"), cls.name, "beta", 1),
        }

    def capture(self) -> Capture:
        return Capture(press_rows=self.window)

    def select(self, net, cache: KVCache, cap: Capture) -> list[list[Tensor]]:
        n, n_layers = cache.length, len(cache.k)

        def kept(layer: int, s: Tensor, b: int, w: int) -> list[int]:
            return [layer_budgets(b, w, n, n_layers, self.beta)[layer]] * len(s)

        return window_select(cache, cap, self.budget, self.window, self.kernel, self.pooling, kept)
