"""What every press shares: the budget, the prefill statistics it reads, scoring helpers, and
the step that turns a full prompt cache into a CompactKVCache (lossy)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cache import KVCache
from ..errors import VeridraftError
from ..models.base import Capture
from ..spec import as_float, as_int
from .compact import CompactKVCache, Tier


def parse_budget(value: str, name: str) -> float:
    """budget=1024 (tokens per head) or budget=0.25 (a ratio of the prompt)."""
    try:
        b = float(value)
    except ValueError:
        raise VeridraftError(
            f"{name}: budget must be a token count (budget=1024) or a ratio in (0, 1) "
            f"(budget=0.25), got {value!r}"
        ) from None
    if b <= 0 or (b >= 1 and b != int(b)):
        raise VeridraftError(
            f"{name}: budget must be a positive token count or a ratio in (0, 1), got {value!r}"
        )
    return b


def tokens_of(budget: float, prompt_len: int) -> int:
    """The per-head token budget for a prompt: a ratio scales the prompt length."""
    b = round(budget * prompt_len) if budget < 1 else int(budget)
    return max(1, min(b, prompt_len))


def to_int(value: str, name: str, key: str, lo: int = 0) -> int:
    return as_int(name, key, value, lo=lo)


def to_float(value: str, name: str, key: str, lo: float, hi: float) -> float:
    return as_float(name, key, value, lo=lo, hi=hi)


@dataclass
class Press(ABC):
    """A KV-compression policy (lossy). Subclasses set `name`, `params` (the names of their
    dataclass fields a spec may set: the registry reads their types and defaults), what they
    need from the prefill (`rows`, `colsum`) and implement `select`."""

    budget: float
    name = "press"
    params = ("budget",)
    rows = 32  # observation-window query rows whose attention the press reads
    colsum = False  # whether it reads the attention every key receives (H2O)
    lossy = True

    @classmethod
    def from_params(cls, params: dict[str, str]) -> Press:
        if "budget" not in params:
            raise VeridraftError(
                f"{cls.name} needs a budget: {cls.name}:budget=1024 (tokens) or budget=0.25 (ratio)"
            )
        return cls(budget=parse_budget(params["budget"], cls.name), **cls.options(params))

    @classmethod
    def options(cls, params: dict[str, str]) -> dict:
        """The press's own parameters (besides budget), converted and checked."""
        return {}

    def spec(self) -> str:
        return f"{self.name}:budget={self.budget:g}"

    def capture(self) -> Capture:
        return Capture(press_rows=self.rows, press_colsum=self.colsum)

    @abstractmethod
    def select(self, net, cache: KVCache, cap: Capture) -> list[list[Tensor]]:
        """Per layer, per KV head: the prompt positions to keep (sorted)."""

    def compress(self, net, cache: KVCache, cap: Capture, room: int) -> CompactKVCache:
        kept = self.select(net, cache, cap)
        return CompactKVCache(cache, kept, room, self.tiers(net, cache, cap))

    def tiers(self, net, cache: KVCache, cap: Capture) -> dict[tuple[int, int], Tier]:
        return {}


def group_mean(scores: Tensor, n_kv: int) -> Tensor:
    """[n_h, L] per query head -> [n_kv, L] per KV head (GQA: mean over the group, as kvpress)."""
    return scores.view(n_kv, -1, scores.shape[-1]).mean(1)


def pool(scores: Tensor, kernel: int, mode: str) -> Tensor:
    """SnapKV's smoothing over neighbouring positions (stride 1, same length)."""
    if kernel <= 1:
        return scores
    x = scores[:, None]
    if mode == "max":
        y = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        y = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)
    return y[:, 0, : scores.shape[-1]]


def window_scores(cap: Capture, layer: int, n_kv: int, window: int, kernel: int, mode: str):
    """SnapKV scores of the non-window prompt positions [n_kv, L - window]."""
    s = group_mean(cap.press_window[layer], n_kv)
    return pool(s[:, : s.shape[-1] - window], kernel, mode)


def top_plus_window(scores: Tensor, n_top: int, length: int, window: int) -> Tensor:
    """Sorted positions: the n_top best-scored (of the first length - window) + the window."""
    top = scores.topk(n_top).indices if n_top > 0 else torch.empty(0, dtype=torch.long)
    return torch.cat((top.sort().values, torch.arange(length - window, length)))


def window_select(
    cache: KVCache,
    cap: Capture,
    budget: float,
    window: int,
    kernel: int,
    pooling: str,
    kept: Callable[[int, Tensor, int, int], list[int]],
) -> list[list[Tensor]]:
    """SnapKV-style selection, layer by layer: per KV head, the window plus its best-scored
    earlier positions. `kept(layer, scores, b, w)` says how many of those each head keeps
    (scores [n_kv, L - w] from `window_scores`, b the token budget, w the window used)."""
    n, n_kv = cache.length, cache.k[0].shape[1]
    b = tokens_of(budget, n)
    w = min(window, b)
    out = []
    for layer in range(len(cache.k)):
        s = window_scores(cap, layer, n_kv, w, kernel, pooling)
        counts = kept(layer, s, b, w)
        out.append([top_plus_window(s[h], counts[h], n, w) for h in range(n_kv)])
    return out


def split_exact(weights: Tensor, total: int, cap: int | None = None) -> list[int]:
    """Integers proportional to weights summing exactly to total (largest remainder), each at
    most cap."""
    w = weights.double().clamp_min(0)
    w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1 / len(w))
    raw = w * total
    out = raw.floor().long()
    if cap is not None:
        out = out.clamp_max(cap)
    rest = total - int(out.sum())
    order = (raw - raw.floor()).argsort(descending=True).tolist()
    while rest > 0:
        moved = False
        for i in order:
            if rest == 0:
                break
            if cap is None or out[i] < cap:
                out[i] += 1
                rest -= 1
                moved = True
        if not moved:
            break
    return out.tolist()
