"""`pruned`: SpecVLM-style verifier-guided pruning of the draft's context (Ji et al., EMNLP 2025).

The target's attention scores the context: at prefill, the last `window` (32) prompt tokens'
attention (SpecVLM: the text queries over the visual tokens), later the verification rows'
(every `refresh` = 8 rounds, averaged with the earlier scores), each a mean over the target's
global layers, heads and rows. Of the prunable positions (everything outside the kept segments -
system, question - and the last window), the draft keeps `keep` (0.1: SpecVLM's drop rate 0.9),
or `budget` positions when given: Stage I takes the best-scored positions until they hold `mass`
(0.4) of the attention, Stage II fills the rest of the budget uniformly over the positions not
taken. One set for every layer; keys keep their original RoPE positions. With a draft model
(`pruned:NAME`, SpecVLM's setting) the scores still come from the target and the draft model
reads the pruned view of its own cache. Default draft length 5.
"""

from __future__ import annotations

import torch

from ..models.base import Capture
from ..spec import Param
from .params import as_float, as_int
from .sparse import SelectContext, Selection, SparseDrafter, global_layers, observe


class PrunedDrafter(SparseDrafter):
    name = "pruned"
    description = "SpecVLM-style pruning of the draft's context, guided by the target's attention"
    method_params = {
        "keep": Param(float, 0.1, "share of the prunable positions kept (without budget)"),
        "mass": Param(float, 0.4, "attention mass the best positions take first"),
        "window": Param(int, 32, "last prompt tokens whose attention scores"),
        "refresh": Param(int, 8, "rounds between re-scorings (0: never)"),
    }
    params = {**SparseDrafter.params, **method_params}
    default_budget = 0
    default_tokens = 5

    def __init__(
        self,
        draft_net=None,
        *,
        keep: float = 0.1,
        mass: float = 0.4,
        window: int = 32,
        refresh: int = 8,
        **kw,
    ) -> None:
        super().__init__(draft_net, **kw)
        self.keep = as_float(self.name, "keep", keep, lo=0.0, hi=1.0)
        self.mass = as_float(self.name, "mass", mass, lo=0.0, hi=1.0)
        self.window = as_int(self.name, "window", window, lo=1)
        self.refresh_every = as_int(self.name, "refresh", refresh, lo=0)
        self._score: torch.Tensor | None = None

    def select(self, sc: SelectContext) -> Selection:
        n = sc.n
        self._score = None
        if n < 2:
            return Selection({}, n)
        w = min(self.window, n - 1)
        cap = observe(sc.target, sc.target_cache, sc.ids, n, w)
        self._score = _mean_attention(cap, sc.target, n)
        return self._pick(sc)

    def _pick(self, sc: SelectContext) -> Selection:
        n = sc.n
        w = min(self.window, n - 1)
        prunable = ~sc.keep
        prunable[n - w :] = False
        cand = prunable.nonzero().flatten()
        n_keep = self.budget if self.budget else int(len(cand) * self.keep)
        if n_keep >= len(cand):
            return Selection({}, n)
        s = self._score[cand]
        order = s.argsort(descending=True)
        total = float(s.sum())
        cum = s[order].cumsum(0)
        n1 = int(torch.searchsorted(cum, self.mass * total)) + 1 if total > 0 else 0
        first = order[: min(n1, n_keep)]
        rest = torch.ones(len(cand), dtype=torch.bool)
        rest[first] = False
        rest_idx = rest.nonzero().flatten()
        fill = n_keep - len(first)
        if fill > 0:  # Stage II: spread evenly over the positions Stage I left
            at = torch.linspace(0, len(rest_idx) - 1, fill).round().long().unique()
            first = torch.cat((first, rest_idx[at]))
        view = torch.cat(((~prunable).nonzero().flatten(), cand[first])).sort().values
        return Selection({i: view for i in sc.layers}, n)

    def wants_capture(self) -> Capture | None:
        every = self.refresh_every
        if every and self._score is not None and self.rounds % every == 0:
            return Capture(attn_rows=64)
        return None

    def refresh(self, sc: SelectContext, start: int, capture) -> Selection | None:
        if capture is None or not capture.attn or self._score is None:
            return None
        new = _mean_attention(capture, sc.target, sc.n)
        self._score = 0.5 * self._score + 0.5 * new
        return self._pick(sc)


def _mean_attention(cap: Capture, target, n: int) -> torch.Tensor:
    """Attention to positions [0, n), each layer's rows normalised, averaged over the target's
    global layers and heads: [n]."""
    layers = [i for i in global_layers(target) if i in cap.attn]
    acc = torch.zeros(n)
    for i in layers:
        a = cap.attn[i][:, :n]
        acc += a.sum(0) / max(float(a.sum()), 1e-30)
    return acc / max(len(layers), 1)
