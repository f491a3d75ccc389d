"""`streaming`: the draft reads sink tokens and a recent window (MagicDec's StreamingLLM draft).

The view is the first `sinks` positions (16) and the last `budget - sinks` cached positions
(budget 257, MagicDec's README run), re-rolled every round so the window follows the text; kept
segments (system, question) are read too. Keys keep their original RoPE positions (MagicDec's
SnapKV draft and LongSpec's MagicDec baseline do the same; MagicDec's StreamingLLM draft
re-indexes positions inside the compressed cache, which only matters past the trained context).
Lossless: verification reads the whole cache. Default draft length 3 (MagicDec's README).
"""

from __future__ import annotations

import torch

from ..spec import Param
from .params import as_int
from .sparse import SelectContext, Selection, SparseDrafter


class StreamingDrafter(SparseDrafter):
    name = "streaming"
    description = "MagicDec's StreamingLLM draft: sink tokens and a recent window"
    method_params = {"sinks": Param(int, 16, "first positions always read")}
    params = {**SparseDrafter.params, **method_params}
    default_budget = 257
    default_tokens = 3

    def __init__(self, draft_net=None, *, sinks: int = 16, **kw) -> None:
        super().__init__(draft_net, **kw)
        self.sinks = as_int(self.name, "sinks", sinks, lo=0, hi=self.budget - 1)

    def select(self, sc: SelectContext) -> Selection:
        return self._window(sc, sc.n)

    def refresh(self, sc: SelectContext, start: int, capture) -> Selection | None:
        return self._window(sc, start)

    def _window(self, sc: SelectContext, n: int) -> Selection:
        if n <= self.budget:
            return Selection({}, n)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[: self.sinks] = True
        keep[n - (self.budget - self.sinks) :] = True
        keep[: sc.keep.shape[0]] |= sc.keep
        view = keep.nonzero().flatten()
        return Selection({i: view for i in sc.layers}, n)
