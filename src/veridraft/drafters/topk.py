"""`topk`: Sparse-to-Dense's draft (StD, ACL 2025): per layer, the top-K context positions by
the prompt's last-window attention, selected once at prefill.

The last `window` (32) prompt tokens play StD's text queries: their attention over the earlier
positions, summed over the rows and over every head of the layer, picks one set of positions per
global layer (no pooling); the window itself and kept segments (system, question - StD keeps all
text and prunes visual tokens) are always read; budget 1024 in all (StD's K + text). Keys keep
their original RoPE positions. Default draft length 9 (StD's gamma).
"""

from __future__ import annotations

from ..spec import Param
from .params import as_int
from .sparse import SelectContext, Selection, SparseDrafter, observe, top_positions


class TopKDrafter(SparseDrafter):
    name = "topk"
    description = (
        "Sparse-to-Dense's draft: per layer, the top-K positions by the prompt's attention"
    )
    method_params = {"window": Param(int, 32, "last prompt tokens whose attention votes")}
    params = {**SparseDrafter.params, **method_params}
    default_budget = 1024
    default_tokens = 9

    def __init__(self, draft_net=None, *, window: int = 32, **kw) -> None:
        super().__init__(draft_net, **kw)
        self.window = as_int(self.name, "window", window, lo=1, hi=self.budget)

    def select(self, sc: SelectContext) -> Selection:
        n, w = sc.n, min(self.window, sc.n - 1)
        cap = observe(sc.net, sc.cache, sc.ids, n, w)
        forced = sc.keep.clone()
        forced[n - w :] = True
        n_free = self.budget - w - int(sc.keep[: n - w].sum())
        views = {}
        for layer in sc.layers:
            s = cap.attn[layer][:, :n].sum(0, keepdim=True)
            views[layer] = top_positions(s, n_free, forced)[0]
        return Selection(views, n)
