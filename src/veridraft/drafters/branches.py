"""Top-k branches for the draft-model drafters: a greedy draft chain (the trunk) plus, at each
depth, the draft's next most likely tokens as leaves (the siblings of that trunk token).

The leaves cost no draft forward (their scores come with the trunk token's), and they pay when the
target disagrees with the draft's first choice but agrees with its second: the accepted path then
ends one token further. A node's path probability is the product of the draft probabilities of
the trunk tokens above it and its own, and the nodes are kept best-first on it, so every prefix of
the list is a tree and the cost model can cut it where one more node stops paying
(`CostModel.best_nodes`). Sampling keeps the chain: independent sibling draws would need a draft
forward each.
"""

from __future__ import annotations

from ..draft import Draft


def branch_tree(
    trunk: list[int],
    confs: list[float],
    alts: list[list[tuple[int, float]]],
    max_nodes: int,
    cost=None,
    context: int | None = None,
) -> Draft:
    """The trunk chain plus each depth's alternatives as leaves, best-first within max_nodes
    (or the cost model's choice); a chain Draft when no leaf is kept."""
    cands: list[tuple[float, int, int, int, int]] = []  # (-prob, depth, kind, token, parent)
    above = 1.0
    for d, tok in enumerate(trunk):
        for tok2, p in alts[d] if d < len(alts) else ():
            cands.append((-above * p, d, 1, tok2, d - 1))
        above *= confs[d]
        cands.append((-above, d, 0, tok, d - 1))
    cands.sort()
    # a trunk node's path probability never exceeds its parent's, and a leaf's never exceeds its
    # trunk parent's, so the sorted list has parents first; ties keep depth order
    chosen = cands[:max_nodes]
    if cost is not None:
        chosen = chosen[: cost.best_nodes([-c[0] for c in chosen], context=context)]
    index = {}  # trunk depth -> node index
    tokens: list[int] = []
    parents: list[int] = []
    for _, d, kind, tok, parent_depth in chosen:
        parent = -1 if parent_depth < 0 else index.get(parent_depth)
        if parent is None:
            continue
        if kind == 0:
            index[d] = len(tokens)
        tokens.append(tok)
        parents.append(parent)
    if parents == list(range(-1, len(tokens) - 1)):
        return Draft(tokens=tokens)
    return Draft(tokens=tokens, parents=parents)
