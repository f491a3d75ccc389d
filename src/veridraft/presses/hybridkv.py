"""HybridKV (Zeng et al., ACL 2026), lossy: heads typed static or dynamic from the prefill.

Per layer and KV head, the observation window's attention (last 32 prompt queries, group mean)
is measured for concentration: the share of its mass on the head's top-`budget` positions.
A head at or above theta (0.9) is *static*: a fixed selection serves it, so it keeps the
prior-selected tokens (with text only, text-prior pruning is the window's top pooled scores plus
the window) and nothing else. Below theta it is *dynamic*: its attention is spread and shifts
while decoding, so its full prompt K/V move to a slower tier (a memory-mapped file in the
cache's element type; tier=bf16 rounds a float32 cache to bfloat16) and every query row
retrieves its top chunks (chunk keys = mean key; the most recent chunk always) up to its budget.

Budgets, top-down: a layer's H * budget tokens are split between the two types in proportion
to their head counts weighted by r (r > 1 favours dynamic heads), then static heads share theirs
in proportion to their concentration score and dynamic heads share theirs evenly. Memory held:
static rows + the chunk keys; the slow tier is reported apart."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..cache import KVCache
from ..errors import VeridraftError
from ..models.base import Capture
from .base import (
    Press,
    group_mean,
    split_exact,
    to_float,
    to_int,
    tokens_of,
    top_plus_window,
    window_scores,
)
from .compact import Tier, mapped_zeros


@dataclass
class HybridKVPress(Press):
    window: int = 32
    kernel: int = 5
    theta: float = 0.9
    r: float = 1.0
    chunk: int = 32
    tier: str = "fp32"
    name = "hybridkv"
    params = ("budget", "window", "kernel", "theta", "r", "chunk", "tier")
    # per layer, per KV head: "static" or "dynamic", and the head's token budget
    kinds: list[list[str]] = field(default_factory=list)
    budgets: list[list[int]] = field(default_factory=list)

    @classmethod
    def options(cls, params: dict[str, str]) -> dict:
        n = cls.name
        tier = params.get("tier", "fp32")
        if tier not in ("fp32", "bf16"):
            raise VeridraftError(f"{n}: tier must be fp32 or bf16, got {tier!r}")
        return {
            "window": to_int(params.get("window", "32"), n, "window", 1),
            "kernel": to_int(params.get("kernel", "5"), n, "kernel", 1),
            "theta": to_float(params.get("theta", "0.9"), n, "theta", 0.0, 1.0),
            "r": to_float(params.get("r", "1"), n, "r", 0.0, 1e6),
            "chunk": to_int(params.get("chunk", "32"), n, "chunk", 1),
            "tier": tier,
        }

    def capture(self) -> Capture:
        return Capture(press_rows=self.window)

    def plan(self, cache: KVCache, cap: Capture) -> None:
        """Type every head and give it its budget (kinds, budgets)."""
        n, n_kv = cache.length, cache.k[0].shape[1]
        b = tokens_of(self.budget, n)
        self.kinds, self.budgets = [], []
        for layer in range(len(cache.k)):
            a = group_mean(cap.press_window[layer], n_kv)
            a = a / a.sum(-1, keepdim=True)
            conc = a.topk(b, -1).values.sum(-1)  # mass on the head's top-b positions
            static = conc >= self.theta
            n_s = int(static.sum())
            n_d = n_kv - n_s
            total = n_kv * b
            dyn = round(total * self.r * n_d / (self.r * n_d + n_s)) if n_d else 0
            per = [0] * n_kv
            if n_s:
                idx = static.nonzero().flatten().tolist()
                for i, x in zip(idx, split_exact(conc[static], total - dyn, cap=n)):
                    per[i] = x
            if n_d:
                idx = (~static).nonzero().flatten().tolist()
                for i, x in zip(idx, split_exact(torch.ones(n_d), dyn, cap=n)):
                    per[i] = x
            self.kinds.append(["static" if s else "dynamic" for s in static.tolist()])
            self.budgets.append(per)

    def select(self, net, cache: KVCache, cap: Capture) -> list[list[Tensor]]:
        self.plan(cache, cap)
        n, n_kv = cache.length, cache.k[0].shape[1]
        out = []
        for layer in range(len(cache.k)):
            heads = []
            for h in range(n_kv):
                b = self.budgets[layer][h]
                if self.kinds[layer][h] == "dynamic" or b == 0:
                    heads.append(torch.empty(0, dtype=torch.long))
                    continue
                w = min(self.window, b)
                s = window_scores(cap, layer, n_kv, w, self.kernel, "avg")[h]
                heads.append(top_plus_window(s, b - w, n, w))
            out.append(heads)
        return out

    def tiers(self, net, cache: KVCache, cap: Capture) -> dict[tuple[int, int], Tier]:
        n = cache.length
        # tier=bf16 rounds a float32 cache's rows; a bfloat16 cache (bf16, q4 modes) is copied
        # as it is, bitwise, whatever the setting (widening it would only double the file)
        bf16 = self.tier == "bf16" or cache.k[0].dtype == torch.bfloat16
        dtype = torch.bfloat16 if bf16 else torch.float32
        out = {}
        for layer, kinds in enumerate(self.kinds):
            for h, kind in enumerate(kinds):
                if kind != "dynamic":
                    continue
                k, v = cache.k[layer][0, h, :n], cache.v[layer][0, h, :n]
                tk, tv = mapped_zeros(tuple(k.shape), dtype), mapped_zeros(tuple(v.shape), dtype)
                tk.copy_(k)
                tv.copy_(v)
                n_chunks = -(-n // self.chunk)
                pad = torch.zeros(n_chunks * self.chunk - n, k.shape[1])
                rep = torch.cat((k.float(), pad)).view(n_chunks, self.chunk, -1).sum(1)
                sizes = torch.full((n_chunks,), float(self.chunk))
                sizes[-1] = n - (n_chunks - 1) * self.chunk
                pick = max(1, self.budgets[layer][h] // self.chunk)
                out[(layer, h)] = Tier(tk, tv, rep / sizes[:, None], self.chunk, pick)
        return out
