"""`snapkv`: the draft reads the positions the prompt's last window attends to most, per KV head
(MagicDec's SnapKV draft; SnapKV, Li et al. 2024).

At prefill, the last `window` (32) prompt tokens' attention over the earlier positions is summed
over those rows and over each KV head's query group, smoothed by average pooling (`kernel` 5),
and every KV head of every global layer keeps its `budget - window` best positions plus the
window itself (budget 257). Selected once; the tokens generated since are read as they come.
Keys keep their original RoPE positions, as MagicDec's SnapKV draft does. Kept segments (system,
question) are always read. Default draft length 3 (MagicDec's README).
"""

from __future__ import annotations

import torch.nn.functional as F

from ..spec import Param
from .params import as_choice, as_int
from .sparse import SelectContext, Selection, SparseDrafter, gqa_sum, observe, top_positions


class SnapKVDrafter(SparseDrafter):
    name = "snapkv"
    description = "MagicDec's SnapKV draft: the positions the prompt's last window attends to most"
    method_params = {
        "window": Param(int, 32, "last prompt tokens whose attention votes"),
        "kernel": Param(int, 5, "pooling kernel over positions"),
        "pooling": Param(str, "avg", "how scores are smoothed", ("avg", "max", "none")),
    }
    params = {**SparseDrafter.params, **method_params}
    default_budget = 257
    default_tokens = 3

    def __init__(
        self, draft_net=None, *, window: int = 32, kernel: int = 5, pooling: str = "avg", **kw
    ) -> None:
        super().__init__(draft_net, **kw)
        self.window = as_int(self.name, "window", window, lo=1, hi=self.budget)
        self.kernel = as_int(self.name, "kernel", kernel, lo=1)
        if self.kernel % 2 == 0:
            self.kernel += 1  # an odd kernel keeps the pooled scores aligned with positions
        self.pooling = as_choice(self.name, "pooling", pooling, ("avg", "max", "none"))

    def select(self, sc: SelectContext) -> Selection:
        n, w = sc.n, min(self.window, sc.n - 1)
        cap = observe(sc.net, sc.cache, sc.ids, n, w)
        n_kv = sc.cache.k[0].shape[1]
        forced = sc.keep.clone()
        forced[n - w :] = True
        views = {}
        for layer in sc.layers:
            s = gqa_sum(cap.attn[layer][:, :n], n_kv)
            s = pool(s, self.kernel, self.pooling)
            views[layer] = top_positions(s, self.budget - w - int(sc.keep[: n - w].sum()), forced)
        return Selection(views, n)


def pool(s, kernel: int, how: str):
    """Smooth [H, L] scores along positions so neighbours of a hit are kept with it."""
    if how == "none" or kernel <= 1:
        return s
    x = s[:, None, :]
    if how == "avg":
        return F.avg_pool1d(x, kernel, 1, kernel // 2, count_include_pad=False)[:, 0]
    return F.max_pool1d(x, kernel, 1, kernel // 2)[:, 0]
