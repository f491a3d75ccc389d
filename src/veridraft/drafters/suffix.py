"""SuffixDecoding: frequency-scored token trees from suffix trees of the prompt, the output and
earlier outputs (Oliaro et al., 2024; ArcticInference's `suffix_tree.cc`, vLLM's `suffix`).

Two suffix tries with per-node counts, each cut at depth `max_depth`: one over this request's
prompt and output, and one global trie over the outputs of earlier generations in this process
(per target and setting; FIFO-evicted after `max_cached` outputs). A node's count is how often its
path occurred, so child.count / node.count estimates P(next token | the path).

To draft, for every match length m = 1, 2, ... (stopping at the first suffix of the context the
trie lacks) the drafter walks the trie with the last m ids and grows a tree from the node it
reaches: best-first on path probability (the product of the count ratios), no node below
`min_prob`, at most floor(m * spec_factor + spec_offset) nodes. The draft with the highest score
(the sum of its path probabilities) wins, ties to the longer match; the two tries are queried
alike and the better draft is proposed. `mode=path` follows the most frequent child only (a
chain). With `datastore=NAME` a retrieval datastore (REST; `veridraft datastore build`) is a
third source, scored the same way (occurrence counts of each continuation prefix).

The number of nodes verified is then cut by the cost model where one more node costs more than
its path probability is expected to commit (`CostModel.best_nodes`), when a profile exists.

Defaults follow the paper's code where it fits a CPU: `min_prob` 0.1 and `spec_factor` 1.0 as in
ArcticInference and vLLM; `max_depth` 24 (vLLM's; ArcticInference uses 64, which costs more
Python per token here for matches that rarely run that long); `max_cached` 10000 (vLLM's).

Proposals are deterministic (point masses) and siblings are distinct, so verification is
lossless under greedy decoding and under sampling.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from ..draft import DecodeContext, Draft, DraftEnv, Round
from ..errors import VeridraftError
from ..spec import Param
from .params import as_choice, as_float, as_int


class _Node:
    __slots__ = ("count", "kids")

    def __init__(self) -> None:
        self.count = 0
        self.kids: dict[int, _Node] = {}


@dataclass
class Proposal:
    """Best-first tree nodes: tokens, parents (-1: child of the last id), path probabilities."""

    tokens: list[int]
    parents: list[int]
    probs: list[float]
    match: int = 0

    @property
    def score(self) -> float:
        return sum(self.probs)


EMPTY = Proposal([], [], [])


class SuffixTrie:
    """Suffix trie of one or more token streams, depth-limited, with occurrence counts."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.root = _Node()
        self._active: dict[int, list[_Node]] = {}  # stream -> nodes of its open suffixes

    def append(self, stream: int, tokens: list[int]) -> None:
        """Extend `stream` by tokens: every suffix ending at each new token gains one count."""
        active = self._active.setdefault(stream, [])
        depth = self.max_depth
        for tok in tokens:
            nxt = []
            # active[i] is the node of the suffix of length len(active) - i; the longest sits
            # first and is dropped once it reaches max_depth
            for node in (*active[max(0, len(active) - (depth - 1)) :], self.root):
                child = node.kids.get(tok)
                if child is None:
                    child = node.kids[tok] = _Node()
                child.count += 1
                nxt.append(child)
            active[:] = nxt
        self._active[stream] = active

    def close(self, stream: int) -> None:
        self._active.pop(stream, None)

    def remove(self, tokens: list[int]) -> None:
        """Undo `append` of a whole closed stream (FIFO eviction of the global trie)."""
        for i in range(len(tokens)):
            node = self.root
            for tok in tokens[i : i + self.max_depth]:
                child = node.kids.get(tok)
                if child is None:
                    break
                child.count -= 1
                if child.count <= 0:
                    del node.kids[tok]
                    break
                node = child

    def speculate(
        self,
        context: list[int],
        max_nodes: int,
        min_prob: float,
        factor: float,
        offset: float,
        tree: bool,
    ) -> Proposal:
        best = EMPTY
        limit = min(len(context), self.max_depth - 1)
        for m in range(1, limit + 1):
            node = self.root
            for tok in context[len(context) - m :]:
                node = node.kids.get(tok)
                if node is None:
                    return best  # a longer suffix contains this one: it misses too
            if not node.kids:
                continue
            budget = min(max_nodes, int(m * factor + offset))
            if budget <= 0:
                continue
            grow = _grow_tree if tree else _grow_path
            prop = grow(node, budget, min_prob)
            prop.match = m
            if prop.tokens and prop.score >= best.score:
                best = prop
        return best


def _grow_tree(node: _Node, budget: int, min_prob: float) -> Proposal:
    """Best-first expansion on path probability: the most likely nodes first, parents first."""
    out = Proposal([], [], [])
    heap: list[tuple[float, int, int, int, _Node]] = []
    tick = 0

    def push(parent_node: _Node, parent: int, prob: float) -> None:
        nonlocal tick
        total = parent_node.count
        for tok, child in parent_node.kids.items():
            p = prob * child.count / total
            if p >= min_prob:
                heapq.heappush(heap, (-p, tick, parent, tok, child))
                tick += 1

    push(node, -1, 1.0)
    while heap and len(out.tokens) < budget:
        neg, _, parent, tok, child = heapq.heappop(heap)
        out.tokens.append(tok)
        out.parents.append(parent)
        out.probs.append(-neg)
        push(child, len(out.tokens) - 1, -neg)
    return out


def _grow_path(node: _Node, budget: int, min_prob: float) -> Proposal:
    """The most frequent child at each step, while the path probability stays >= min_prob."""
    out = Proposal([], [], [])
    prob = 1.0
    while node.kids and len(out.tokens) < budget:
        tok, child = max(node.kids.items(), key=lambda kv: kv[1].count)
        prob *= child.count / node.count
        if prob < min_prob:
            break
        out.parents.append(len(out.tokens) - 1)
        out.tokens.append(tok)
        out.probs.append(prob)
        node = child
    return out


@dataclass
class _Global:
    trie: SuffixTrie
    outputs: list[list[int]]
    # the generation in progress: its ids (growing in place) and where its output starts; filed
    # when the next generation starts, since drafters are made per generation
    pending: tuple[list[int], int] | None = None

    def file(self, max_cached: int) -> None:
        if self.pending is None:
            return
        ids, start = self.pending
        self.pending = None
        out = list(ids[start:])
        if len(out) < 2:
            return
        self.trie.append(1, out)
        self.trie.close(1)
        self.outputs.append(out)
        while len(self.outputs) > max_cached:
            self.trie.remove(self.outputs.pop(0))


# (id(target), settings) -> the global trie of earlier outputs in this process
_GLOBAL: dict[tuple, _Global] = {}


class SuffixDrafter:
    """Token trees from suffix tries of this request and of earlier outputs."""

    name = "suffix"
    takes_arg = False
    description = "SuffixDecoding: token trees from suffix tries of this and earlier outputs"
    params = {
        "max_depth": Param(int, 24, "deepest suffix matched"),
        "min_prob": Param(float, 0.1, "drop tree nodes below this path probability"),
        "spec_factor": Param(float, 1.0, "draft length per matched token"),
        "spec_offset": Param(float, 0.0, "draft length added to that"),
        "max_cached": Param(int, 10000, "earlier outputs kept in the global trie"),
        "mode": Param(str, "tree", "a token tree, or its best path only", ("path", "tree")),
        "nodes": Param(int, None, "tree nodes (default: the cost model's cut)"),
        "datastore": Param(str, None, "a retrieval datastore searched too (veridraft datastore)"),
    }
    aliases = {
        "max_tree_depth": "max_depth",
        "min_token_prob": "min_prob",
        "max_spec_factor": "spec_factor",
        "max_spec_offset": "spec_offset",
        "max_cached_requests": "max_cached",
    }

    def __init__(
        self,
        max_depth: int = 24,
        min_prob: float = 0.1,
        spec_factor: float = 1.0,
        spec_offset: float = 0.0,
        max_cached: int = 10000,
        mode: str = "tree",
        nodes: int | None = None,
        datastore: str | None = None,
    ) -> None:
        self.max_depth = as_int("suffix", "max_depth", max_depth, lo=2, hi=256)
        self.min_prob = as_float("suffix", "min_prob", min_prob, lo=0.0, hi=1.0)
        self.spec_factor = as_float("suffix", "spec_factor", spec_factor, lo=0.0)
        self.spec_offset = as_float("suffix", "spec_offset", spec_offset)
        self.max_cached = as_int("suffix", "max_cached", max_cached, lo=0)
        self.mode = as_choice("suffix", "mode", mode, ("tree", "path"))
        self.nodes = None if nodes is None else as_int("suffix", "nodes", nodes, lo=1)
        self.datastore_name = datastore
        self.store = None  # a loaded retrieval datastore (veridraft.datastore.Datastore)
        self.cost = None  # the cost model (CostModel) cuts the tree when set
        self._local: SuffixTrie | None = None
        self._global: _Global | None = None
        self._ctx: DecodeContext | None = None
        self._seen = 0  # ids already in the local trie
        self.last_source = ""  # which source the last proposal came from (for tests and stats)
        self.last_score = 0.0  # the proposed tree's expected accepted tokens (sum of path probs)
        # drafters of another scope keep another global trie (a hybrid's suffix part)
        self.scope = ""

    @classmethod
    def from_spec(
        cls, model, arg: str | None, params: dict, env: DraftEnv | None = None
    ) -> SuffixDrafter:
        d = cls(**params)
        if env is not None and env.cost is not None:
            d.cost = env.cost(model)
        if d.datastore_name:
            if env is None or env.datastore is None:
                raise VeridraftError(
                    "suffix: datastore= needs the package's datastore loader; create the drafter "
                    "with make_drafter(spec, model) from veridraft"
                )
            d.store = env.datastore(d.datastore_name, model)
        return d

    @property
    def unsized_trees(self) -> bool:
        """Its trees are sized by neither a cost profile nor `nodes=` (the paper's limits)."""
        return self.cost is None and self.nodes is None

    def __repr__(self) -> str:
        return (
            f"SuffixDrafter(max_depth={self.max_depth}, min_prob={self.min_prob}, "
            f"mode={self.mode!r}, datastore={self.datastore_name!r})"
        )

    def _settings(self) -> tuple:
        # every setting: two differently configured drafters never share earlier outputs, so a
        # benchmark that runs both on one question does not hand the second the first's answer
        return (
            self.scope,
            self.max_depth,
            self.max_cached,
            self.min_prob,
            self.spec_factor,
            self.spec_offset,
            self.mode,
            self.nodes,
            self.datastore_name,
        )

    # -- drafter protocol --

    def prefill(self, ctx: DecodeContext) -> None:
        self._ctx = ctx
        self._local = SuffixTrie(self.max_depth)
        self._local.append(0, ctx.ids)
        self._seen = len(ctx.ids)
        self._global = None
        if self.max_cached > 0:
            key = (id(ctx.target), *self._settings())
            self._global = _GLOBAL.setdefault(key, _Global(SuffixTrie(self.max_depth), []))
            self._global.file(self.max_cached)
            self._global.pending = (ctx.ids, ctx.prompt_len)

    def _catch_up(self, ids: list[int]) -> None:
        if len(ids) > self._seen:
            self._local.append(0, ids[self._seen :])
            self._seen = len(ids)

    def propose(self, ctx: DecodeContext, max_tokens: int) -> Draft:
        if self._local is None or ctx is not self._ctx:
            self.prefill(ctx)
        self._catch_up(ctx.ids)
        cap = min(max_tokens, self.nodes or max_tokens)
        if cap <= 0:
            return Draft(tokens=[])
        context = ctx.ids[-self.max_depth :]
        args = (cap, self.min_prob, self.spec_factor, self.spec_offset, self.mode == "tree")
        best, source = self._local.speculate(context, *args), "local"
        if self._global is not None and self._global.outputs:
            other = self._global.trie.speculate(context, *args)
            if other.score > best.score:
                best, source = other, "global"
        if self.store is not None:
            other = self.store.speculate(ctx.ids, cap, self.min_prob, self.mode == "tree")
            if other.score > best.score:
                best, source = other, "datastore"
        n = len(best.tokens)
        if self.cost is not None and self.nodes is None and n:
            n = self.cost.best_nodes(best.probs, context=len(ctx.ids))
        self.last_source = source if n else ""
        self.last_score = sum(best.probs[:n])
        if n == 0:
            return Draft(tokens=[])
        tokens, parents = best.tokens[:n], best.parents[:n]
        if parents == list(range(-1, n - 1)):
            return Draft(tokens=tokens)
        return Draft(tokens=tokens, parents=parents)

    def update(self, rnd: Round | int, next_token: int | None = None) -> None:
        pass  # the local trie catches up with ctx.ids on the next propose
