"""Token trees: a draft whose nodes branch (SpecInfer, EAGLE, Token Recycling).

A tree of n nodes is a parents list (see draft.Draft.parents). The target runs the last committed
token (the root, row 0) and every node (row i + 1) in one forward: row r sees the cached prefix,
the root and its own ancestors, at position start + depth(r). The accepted root-to-node path is
then copied down into consecutive cache positions (KVCache.keep), so the cache ends up exactly as
if that path had been verified as a chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import VeridraftError


def check_parents(parents: list[int], n: int) -> None:
    """Raise a one-line VeridraftError unless `parents` is a topologically ordered tree of n."""
    if len(parents) != n:
        raise VeridraftError(f"a tree draft needs one parent per token ({len(parents)} for {n})")
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise VeridraftError(
                f"tree node {i} has parent {p}; a parent must be -1 (the last committed token) "
                "or an earlier node"
            )


def depths(parents: list[int]) -> list[int]:
    """Depth of each node: 1 for a child of the root."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def ancestor_rows(parents: list[int]) -> list[list[int]]:
    """Per row (root first): the rows it attends to among the new ones, root first, itself last."""
    rows: list[list[int]] = [[0]]
    for i, p in enumerate(parents):
        rows.append([*rows[p + 1], i + 1])
    return rows


def is_chain(parents: list[int] | None) -> bool:
    return parents is None or all(p == i - 1 for i, p in enumerate(parents))


def children(parents: list[int]) -> list[list[int]]:
    """Per row (root first): the node indices of its children, in order."""
    out: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, p in enumerate(parents):
        out[p + 1].append(i)
    return out


@dataclass
class TreeAttn:
    """What a forward over [root] + tree nodes needs: per-row depth (positions start + depth),
    the [1 + n, 1 + n] ancestor mask among the new rows, and each row's ancestor rows."""

    depth: torch.Tensor  # [1 + n] long, 0 for the root
    mask: torch.Tensor  # [1 + n, 1 + n] bool, True = row may attend to that new row
    rows: list[list[int]]


def tree_attn(parents: list[int]) -> TreeAttn:
    check_parents(parents, len(parents))
    rows = ancestor_rows(parents)
    t = len(rows)
    mask = torch.zeros(t, t, dtype=torch.bool)
    for r, anc in enumerate(rows):
        mask[r, anc] = True
    depth = torch.tensor([0, *depths(parents)], dtype=torch.long)
    return TreeAttn(depth=depth, mask=mask, rows=rows)


def tree_mask(parents: list[int], prefix: int) -> torch.Tensor:
    """[1 + n, prefix + 1 + n] bool: every row sees the cached prefix, the root and its own
    ancestors (global attention; sliding windows are applied by the model)."""
    m = tree_attn(parents).mask
    return torch.cat((torch.ones(m.shape[0], prefix, dtype=torch.bool), m), dim=1)


def positions(parents: list[int], start: int) -> list[int]:
    """Position of each row, root first: start + depth."""
    return [start, *(start + d for d in depths(parents))]
