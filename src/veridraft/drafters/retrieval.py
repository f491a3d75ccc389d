"""`retrieval`: the draft reads the KV chunks that best match the current query, per KV head
(TriForce's retrieval cache, Sun et al. 2024).

The prompt's cache is cut into chunks of `chunk` (8) positions; a chunk's key is the mean of its
keys. The query of the last prompt token (run again past the prompt, as TriForce re-feeds it)
scores the chunks, q . key summed over each KV head's query group, and every KV head of every
global layer keeps its best `budget / chunk - 1` chunks plus chunk 0 (the sinks); budget 4096,
TriForce's. A last partial chunk and the tokens generated since are always read. Selected once,
as TriForce does; `refresh=N` re-scores every N rounds with the query of the last verification
row (the target drafting for itself only: a draft model's keys do not match the target's
queries). Keys keep their original RoPE positions. Default draft length 6 (TriForce's gamma).
"""

from __future__ import annotations

import torch

from ..models.base import Capture
from ..spec import Param
from .params import as_int
from .sparse import SelectContext, Selection, SparseDrafter, observe, top_positions


class RetrievalDrafter(SparseDrafter):
    name = "retrieval"
    description = "TriForce's retrieval cache: the KV chunks that best match the current query"
    method_params = {
        "chunk": Param(int, 8, "positions per chunk"),
        "refresh": Param(int, 0, "rounds between re-scorings (0: never)"),
    }
    params = {**SparseDrafter.params, **method_params}
    default_budget = 4096
    default_tokens = 6

    def __init__(self, draft_net=None, *, chunk: int = 8, refresh: int = 0, **kw) -> None:
        super().__init__(draft_net, **kw)
        self.chunk = as_int(self.name, "chunk", chunk, lo=1, hi=max(1, self.budget // 2))
        self.refresh_every = as_int(self.name, "refresh", refresh, lo=0)
        self._keys: dict[int, torch.Tensor] = {}

    def select(self, sc: SelectContext) -> Selection:
        c = self.chunk
        upto = (sc.n // c) * c
        n_chunks = upto // c
        self._keys = {}
        if n_chunks * c <= self.budget:
            return Selection({}, sc.n)
        for layer in sc.layers:
            k = sc.cache.k[layer][0, :, :upto].float()
            self._keys[layer] = k.reshape(k.shape[0], n_chunks, c, -1).mean(2)
        cap = observe(sc.net, sc.cache, sc.ids, sc.n, 1, queries=True)
        return self._pick(sc, cap.query, upto)

    def _pick(self, sc: SelectContext, query: dict, upto: int) -> Selection:
        c = self.chunk
        n_chunks = upto // c
        forced = sc.keep[:upto].reshape(n_chunks, c).any(1)
        forced[0] = True
        free = self.budget // c - int(forced.sum())
        offs = torch.arange(c)
        views = {}
        for layer, keys in self._keys.items():
            n_kv = keys.shape[0]
            q = query[layer][:, -1].reshape(n_kv, -1, keys.shape[-1])  # [n_kv, group, hd]
            scores = (q @ keys.transpose(-1, -2)).sum(1)  # [n_kv, n_chunks]
            chunks = top_positions(scores, free, forced)
            views[layer] = (chunks[..., None] * c + offs).flatten(1)
        return Selection(views, upto)

    def wants_capture(self) -> Capture | None:
        every = self.refresh_every
        if every and self._keys and self.net is None and self.rounds % every == 0:
            return Capture(attn_rows=1, queries=True)
        return None

    def refresh(self, sc: SelectContext, start: int, capture) -> Selection | None:
        if capture is None or not capture.query or not self._keys:
            return None
        return self._pick(sc, capture.query, self.sel.upto)
