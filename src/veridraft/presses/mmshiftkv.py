"""MM-ShiftKV (Shu et al., Findings of ACL 2026), lossy: decode-aware prefill selection.

Prefill queries are a poor guess of what decoding will ask, so per layer the press builds
probe queries from the attention input's statistics with a widened spread (hidden states drawn
from N(mu, (kappa * sigma)^2), kappa = 10, global scalar mu and sigma: the official Qwen path),
projects them with the layer's own W_q (and q-norm), and rotates them to future positions: 32
groups of 16 probes, probe j of a group at p_last + 32 * (j + 1). Per KV head (GQA: group
mean) and per probe group, the attention mass summed over the group plus the last real
query's, over (1 + group size), votes for the smallest key set covering 95% of it; a key's
score is its vote count plus the last query's attention. Each head keeps its top budget - 1
keys plus the last prompt token. Prefill only, uniform budget (the official code overrides its
head-adaptive capacity with a uniform one)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cache import KVCache
from ..models.base import Capture, apply_rope
from .base import Press, group_mean, to_float, to_int, tokens_of


@dataclass
class MMShiftKVPress(Press):
    groups: int = 32
    probes: int = 16  # per group
    stride: int = 32  # position step between a group's probes
    kappa: float = 10.0
    mass: float = 0.95
    seed: int = 0
    name = "mm-shiftkv"
    params = ("budget", "groups", "probes", "kappa", "mass", "seed")
    rows = 1

    @classmethod
    def options(cls, params: dict[str, str]) -> dict:
        n = cls.name
        return {
            "groups": to_int(params.get("groups", "32"), n, "groups", 1),
            "probes": to_int(params.get("probes", "16"), n, "probes", 1),
            "kappa": to_float(params.get("kappa", "10"), n, "kappa", 0.0, 1e3),
            "mass": to_float(params.get("mass", "0.95"), n, "mass", 0.0, 1.0),
            "seed": to_int(params.get("seed", "0"), n, "seed"),
        }

    def probe_queries(self, net, layer: int, cap: Capture, last: int, gen) -> Tensor:
        """[n_h, groups * probes, hd] rotated probe queries of one layer."""
        attn = net.layers[layer].attention
        mu, sigma = cap.press_input[layer]
        m = self.groups * self.probes
        h = torch.randn(m, net.config.dim, generator=gen) * (self.kappa * sigma) + mu
        q = attn.wqkv(h).view(m, -1, attn.hd)[:, : attn.n_h]
        if attn.qk_weight is not None:
            q = F.rms_norm(q, (attn.hd,), eps=attn.eps) * attn.qk_weight[: attn.n_h]
        pos = last + self.stride * (torch.arange(self.probes).repeat(self.groups) + 1)
        cos, sin = net.rope.at(attn.rope_index, pos)
        return apply_rope(q, cos, sin).transpose(0, 1)

    def scores(self, net, cache: KVCache, cap: Capture, layer: int, gen) -> Tensor:
        """[n_kv, L] vote count + last-query attention per prompt position."""
        n, n_kv = cache.length, cache.k[0].shape[1]
        attn = net.layers[layer].attention
        q = self.probe_queries(net, layer, cap, n - 1, gen)
        g = q.shape[0] // n_kv
        last = group_mean(cap.press_last[layer], n_kv)  # [n_kv, L]
        out = torch.empty(n_kv, n)
        for h in range(n_kv):
            keys = cache.k[layer][0, h, :n].float()  # a bfloat16 cache widened
            w = (q[h * g : (h + 1) * g] @ keys.T * attn.scale).softmax(-1).mean(0)  # [M, L]
            mass = (w.view(self.groups, self.probes, n).sum(1) + last[h]) / (1 + self.probes)
            srt, order = mass.sort(-1, descending=True)
            # the smallest set covering `mass` of each group: keys before the crossing point
            need = (srt.cumsum(-1) < self.mass * srt.sum(-1, keepdim=True)).sum(-1) + 1
            chosen = torch.arange(n)[None, :] < need[:, None]
            votes = torch.zeros(n).index_add_(0, order[chosen], torch.ones(int(chosen.sum())))
            out[h] = votes + last[h]
        return out

    def select(self, net, cache: KVCache, cap: Capture) -> list[list[Tensor]]:
        n, n_kv = cache.length, cache.k[0].shape[1]
        b = tokens_of(self.budget, n)
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for layer in range(len(cache.k)):
            s = self.scores(net, cache, cap, layer, gen)[:, : n - 1]
            out.append(
                [
                    torch.cat((s[h].topk(b - 1).indices.sort().values, torch.tensor([n - 1])))
                    for h in range(n_kv)
                ]
            )
        return out
