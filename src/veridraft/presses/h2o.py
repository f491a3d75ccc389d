"""H2O (Zhang et al., 2023), lossy: heavy hitters + recent tokens. The heavy-hitter score of a
position is the attention it received, accumulated over every prompt query (group mean for
GQA); half the budget goes to the most recent positions, the other half to the best-scored
older ones. Applied once after prefill (the reference evicts at every step; here the tokens
generated after the prompt are all kept, so speculative decoding stays exact against it)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..cache import KVCache
from ..models.base import Capture
from .base import Press, group_mean, to_float, tokens_of, top_plus_window


@dataclass
class H2OPress(Press):
    recent: float = 0.5
    name = "h2o"
    params = ("budget", "recent")
    rows = 1
    colsum = True

    @classmethod
    def options(cls, params: dict[str, str]) -> dict:
        return {"recent": to_float(params.get("recent", "0.5"), cls.name, "recent", 0.0, 1.0)}

    def select(self, net, cache: KVCache, cap: Capture) -> list[list[Tensor]]:
        n, n_kv = cache.length, cache.k[0].shape[1]
        b = tokens_of(self.budget, n)
        r = min(b, max(1, round(b * self.recent)))
        out = []
        for layer in range(len(cache.k)):
            s = group_mean(cap.press_colsums[layer], n_kv)[:, : n - r]
            out.append([top_plus_window(s[h], b - r, n, r) for h in range(n_kv)])
        return out
