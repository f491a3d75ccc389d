"""StreamingLLM (Xiao et al., 2023), lossy: keep the first `sink` positions (attention sinks)
and the most recent ones, budget tokens per head in all. Applied once after prefill; the tokens
generated after it are all kept. Reads no attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache import KVCache
from .base import Press, to_int, tokens_of


@dataclass
class StreamingPress(Press):
    sink: int = 4
    name = "streaming"
    params = ("budget", "sink")
    rows = 0

    @classmethod
    def options(cls, params: dict[str, str]) -> dict:
        return {"sink": to_int(params.get("sink", "4"), cls.name, "sink")}

    def capture(self):
        return None  # position-only: no attention needed

    def select(self, net, cache: KVCache, cap) -> list[list[Tensor]]:
        n = cache.length
        b = tokens_of(self.budget, n)
        sink = min(self.sink, b)
        keep = torch.cat((torch.arange(sink), torch.arange(n - (b - sink), n)))
        n_kv = cache.k[0].shape[1]
        return [[keep] * n_kv for _ in cache.k]
