"""Token Recycling: the target's own top-k candidates of earlier steps, replayed as a token tree.

Every verification forward already computes the target's next-token scores at each row; Token
Recycling (Luo et al., 2024) keeps the top-k ids of each row in an adjacency table (vocab x k):
row `t` holds the k tokens the target most recently ranked highest after token `t`. To draft, it
expands a static tree from the last committed token: a node of token t at rank r is the r-th
entry of the table's row for its parent's token. The table outlives a generation (the paper's
"hot start"): one per target and k in the process.

The tree's shape comes from how often the committed token sat at each rank of the table (counted
on every accepted transition, before the table is updated): a node's probability of lying on the
accepted path is the product of its ranks' frequencies along the path, so the best-first tree is
exact under that model, and the cost model (`CostModel.best_nodes`) cuts it where one more node
costs more than it is expected to commit. Without a cost profile the tree has `nodes` (16) nodes.

Proposals are deterministic (point masses, q None) and siblings are distinct (a table row holds
distinct ids), so the tree is verified losslessly under greedy decoding and under sampling.

Parameters: `topk` (k, default 8 as in the paper), `nodes` (a fixed node budget; default: the
cost model's choice), `max_nodes` (the largest tree considered, 32), `hot` (1: keep the table
across generations; 0: start empty each time).
"""

from __future__ import annotations

import heapq

import torch

from ..draft import DecodeContext, Draft, DraftEnv, Round, as_round
from ..spec import Param
from .params import as_bool, as_int

DEFAULT_NODES = 16
RESHAPE_EVERY = 16  # rounds between re-fitting the tree shape to the measured rank frequencies
# rank frequencies assumed before any round is seen (shape of the paper's measured tree)
PRIOR = (0.45, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01)
PRIOR_WEIGHT = 20.0

# (id(target), vocab, k) -> [vocab, k] int32 table; -1 = not seen yet
_TABLES: dict[tuple[int, int, int], torch.Tensor] = {}


def tree_shape(rank_probs: list[float], max_nodes: int) -> list[tuple[int, int, float]]:
    """Best-first static tree: (parent shape index or -1, rank, path probability) per node,
    parents first. A node's path probability is the product of its ranks' probabilities."""
    out: list[tuple[int, int, float]] = []
    heap = [(-p, i, -1, r) for i, (r, p) in enumerate(enumerate(rank_probs)) if p > 0]
    heapq.heapify(heap)
    tick = len(heap)
    while heap and len(out) < max_nodes:
        neg, _, parent, rank = heapq.heappop(heap)
        out.append((parent, rank, -neg))
        me = len(out) - 1
        for r, p in enumerate(rank_probs):
            if p > 0:
                heapq.heappush(heap, (neg * p, tick, me, r))
                tick += 1
    return out


def update_table(table: torch.Tensor, tokens: list[int], scores: torch.Tensor) -> None:
    """Row tokens[i] of the table <- the top-k ids of scores[i] (later rows win on repeats)."""
    k = table.shape[1]
    top = scores.topk(k, dim=-1).indices.to(table.dtype)
    table[torch.tensor(tokens, dtype=torch.long)] = top
    # index_put with repeated rows keeps an unspecified one; the last occurrence is the freshest
    seen: dict[int, int] = {}
    for i, t in enumerate(tokens):
        seen[t] = i
    if len(seen) < len(tokens):
        for t, i in seen.items():
            table[t] = top[i]


class RecycleDrafter:
    """Token trees from the target's recycled top-k candidates."""

    name = "recycle"
    takes_arg = False
    wants_scores = True
    description = "Token Recycling: the target's earlier top-k candidates replayed as a tree"
    params = {
        "topk": Param(int, 8, "candidates kept per token"),
        "nodes": Param(int, None, "tree nodes (default: the cost model's best, else 16)"),
        "max_nodes": Param(int, 32, "largest tree considered"),
        "hot": Param(bool, True, "start from the table of earlier generations"),
    }
    aliases = {"k": "topk"}

    def __init__(
        self, topk: int = 8, nodes: int | None = None, max_nodes: int = 32, hot: bool = True
    ) -> None:
        self.topk = as_int("recycle", "topk", topk, lo=1, hi=64)
        self.nodes = None if nodes is None else as_int("recycle", "nodes", nodes, lo=1)
        self.max_nodes = as_int("recycle", "max_nodes", max_nodes, lo=1, hi=256)
        self.hot = as_bool("recycle", "hot", hot)
        self.cost = None  # the cost model (CostModel) picks the node budget when set
        self._hits = [0.0] * self.topk
        self._trials = 0.0
        self._table: torch.Tensor | None = None
        self._key: tuple[int, int, int] | None = None
        self._shape: list[tuple[int, int, float]] = []
        self._budget = 0
        self._rounds = 0
        self._last: Draft | None = None
        self._root = -1

    @classmethod
    def from_spec(
        cls, model, arg: str | None, params: dict, env: DraftEnv | None = None
    ) -> RecycleDrafter:
        d = cls(**params)
        if env is not None and env.cost is not None:
            d.cost = env.cost(model)
        return d

    @property
    def unsized_trees(self) -> bool:
        """Its trees are sized by neither a cost profile nor `nodes=` (the default 16 nodes)."""
        return self.cost is None and self.nodes is None

    def __repr__(self) -> str:
        return f"RecycleDrafter(topk={self.topk}, nodes={self.nodes}, max_nodes={self.max_nodes})"

    # -- shape --

    def rank_probs(self) -> list[float]:
        """P(the committed token is the table's rank-r candidate), prior-smoothed."""
        prior = [PRIOR[r] if r < len(PRIOR) else PRIOR[-1] / 2 for r in range(self.topk)]
        total = self._trials + PRIOR_WEIGHT
        return [(self._hits[r] + PRIOR_WEIGHT * prior[r]) / total for r in range(self.topk)]

    def _reshape(self) -> None:
        self._shape = tree_shape(self.rank_probs(), self.max_nodes)
        if self.nodes is not None:
            self._budget = min(self.nodes, len(self._shape))
        elif self.cost is not None:
            self._budget = self.cost.best_nodes([p for _, _, p in self._shape])
        else:
            self._budget = min(DEFAULT_NODES, len(self._shape))

    # -- drafter protocol --

    def prefill(self, ctx: DecodeContext) -> None:
        vocab = int(getattr(getattr(ctx.target, "config", None), "vocab_size", 0) or 0)
        self._vocab = vocab
        self._key = (id(ctx.target), vocab, self.topk)
        self._table = _TABLES.get(self._key) if self.hot else None
        if self._table is None and vocab:
            self._table = torch.full((vocab, self.topk), -1, dtype=torch.int32)
            if self.hot:
                _TABLES[self._key] = self._table
        self._reshape()
        self._rounds = 0

    def propose(self, ctx: DecodeContext, max_tokens: int) -> Draft:
        self._root = ctx.ids[-1]
        n = min(self._budget, max_tokens)
        if self._table is None or n <= 0:
            self._last = Draft(tokens=[])
            return self._last
        rows: dict[int, list[int]] = {}  # token -> its table row, read once per round

        def row(t: int) -> list[int]:
            if t not in rows:
                rows[t] = self._table[t].tolist()
            return rows[t]

        tokens: list[int] = []
        parents: list[int] = []
        where: list[int] = []  # shape index -> draft index, -1 when pruned
        for parent, rank, _ in self._shape[:n]:
            if parent < 0:
                src = self._root
            else:
                src = tokens[where[parent]] if where[parent] >= 0 else -1
            tok = row(src)[rank] if src >= 0 else -1
            if tok < 0:
                where.append(-1)
                continue
            where.append(len(tokens))
            parents.append(-1 if parent < 0 else where[parent])
            tokens.append(tok)
        self._last = Draft(tokens=tokens, parents=parents if tokens else None)
        return self._last

    def update(self, rnd: Round | int, next_token: int | None = None) -> None:
        rnd = as_round(rnd, next_token)
        draft = self._last
        if draft is None or rnd.scores is None or self._table is None:
            return
        # rank statistics of this round's committed transitions, against the table as drafted
        committed = rnd.committed
        prev = self._root
        for tok in committed:
            row = self._table[prev].tolist()
            self._trials += 1
            if tok in row:
                self._hits[row.index(tok)] += 1
            prev = tok
        rows = [self._root, *draft.tokens]
        scores = rnd.scores[: len(rows)]
        update_table(self._table, rows, scores)
        # the accepted path's rows are the true context: write them last so they win repeats
        path = committed[:-1]
        if path:
            keep = [self._root, *path]
            idx = [0] + [i + 1 for i in _path_rows(draft, path)]
            update_table(self._table, keep, scores[idx])
        self._rounds += 1
        if self.nodes is None and self._rounds % RESHAPE_EVERY == 0:
            self._reshape()
        self._last = None


def _path_rows(draft: Draft, path: list[int]) -> list[int]:
    """Draft indices of the accepted path (the committed tokens before the next one)."""
    parents = draft.parents or list(range(-1, len(draft.tokens) - 1))
    out: list[int] = []
    cur = -1
    for tok in path:
        cur = next(i for i, p in enumerate(parents) if p == cur and draft.tokens[i] == tok)
        out.append(cur)
    return out
