"""A compacted KV cache (lossy): per layer and KV head, the prompt rows a press kept, then room
for the tokens generated after it.

Layout. Each layer owns one flat buffer [sum over heads of (kept_h + room), head_dim] for keys
and one for values; KV head h owns a contiguous segment of it: its kept prompt rows in position
order, then the rows of new tokens. Head-wise budgets (AdaKV, HybridKV) therefore cost exactly
their rows, with no padding to the longest head or to the prompt length. When every head of a
layer kept the same count (SnapKV, StreamingLLM, ...), the buffer is viewed as
[1, n_kv, kept + room, hd] and attended in one call; otherwise head by head.

Positions. `length` stays the logical position (prompt length + tokens since), so the forward
applies RoPE at each new token's original position; the cache maps position p >= base to row
kept_h + (p - base) of head h: that fixed per-head offset is what lets new tokens continue their
positions in a smaller buffer. Rows are copied once, never recomputed or re-rotated, so every
kept row is bitwise the full cache's row.

Dynamic heads (HybridKV) keep no prompt rows here: their full prompt K/V live in a slower tier
(a memory-mapped file) and each query row retrieves its top chunks from it (see `Tier`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache import KVCache
from ..errors import VeridraftError
from ..models.base import _attend


@dataclass
class Tier:
    """One dynamic head's slow tier: the prompt's K/V in a memory-mapped file, chunk keys
    (the mean key of each chunk) in memory, and how many chunks a query row retrieves."""

    k: Tensor  # [L, hd] memory-mapped
    v: Tensor
    rep: Tensor  # [n_chunks, hd] float32
    chunk: int
    n_pick: int

    def rows(self, q: Tensor, scale: float) -> Tensor:
        """Positions a query group q [g, hd] retrieves: its top chunks by mean q . chunk key,
        the last chunk (the most recent tokens) always among them, in position order."""
        score = (q @ self.rep.T).mean(0) * scale
        last = self.rep.shape[0] - 1
        score[last] = float("inf")
        top = score.topk(min(self.n_pick, last + 1)).indices.sort().values
        n = self.k.shape[0]
        return torch.cat([torch.arange(c * self.chunk, min(n, (c + 1) * self.chunk)) for c in top])


def _map(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A zero tensor backed by an anonymous temporary file (gone when the tensor is freed)."""
    n = 1
    for d in shape:
        n *= d
    fd, path = tempfile.mkstemp(prefix="veridraft-kvtier-")
    try:
        os.ftruncate(fd, max(1, n * torch.empty(0, dtype=dtype).element_size()))
        t = torch.from_file(path, shared=True, size=n, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(path)
    return t.view(shape)


class CompactKVCache:
    """Drop-in for KVCache after a press (lossy): same length / reserve / write / truncate /
    keep contract, smaller memory. `kept[layer][head]` records the original positions kept."""

    lossy = True

    def __init__(
        self,
        full: KVCache,
        kept: list[list[Tensor]],
        room: int,
        dynamic: dict[tuple[int, int], Tier] | None = None,
    ) -> None:
        self.base = full.length
        self.length = full.length
        self.max_len = full.length + room
        self.low_water = self.max_len
        self.kept = [[k.to(torch.long) for k in heads] for heads in kept]
        self.dynamic = dynamic or {}
        self.n = [[len(k) for k in heads] for heads in self.kept]
        hd = full.k[0].shape[-1]
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.off: list[list[int]] = []
        self.uniform: list[bool] = []
        for layer, heads in enumerate(self.kept):
            caps = [n + room for n in self.n[layer]]
            offs = [sum(caps[:h]) for h in range(len(caps))]
            kb = full.k[layer].new_empty(sum(caps), hd)
            vb = full.v[layer].new_empty(sum(caps), hd)
            for h, idx in enumerate(heads):
                kb[offs[h] : offs[h] + len(idx)] = full.k[layer][0, h].index_select(0, idx)
                vb[offs[h] : offs[h] + len(idx)] = full.v[layer][0, h].index_select(0, idx)
            self.k.append(kb)
            self.v.append(vb)
            self.off.append(offs)
            self.uniform.append(
                len(set(caps)) == 1 and not any(d[0] == layer for d in self.dynamic)
            )

    # -- the KVCache contract --

    def __len__(self) -> int:
        return self.length

    def reserve(self, n_new: int) -> int:
        if self.length + n_new > self.max_len:
            raise VeridraftError(
                f"compacted KV cache full: {self.length} + {n_new} positions exceed its "
                f"{self.max_len}; compress with more room (a larger max_new_tokens)"
            )
        return self.length

    def mark(self) -> None:
        self.low_water = self.max_len

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, n: int) -> None:
        if not self.base <= n <= self.length:
            raise ValueError(
                f"cannot truncate a compacted cache of length {self.length} to {n} "
                f"(its compressed prompt ends at {self.base})"
            )
        self.length = n

    def _rows(self, layer: int, h: int, pos: int, t: int) -> slice:
        o = self.off[layer][h] + self.n[layer][h] + pos - self.base
        return slice(o, o + t)

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> None:
        """k, v [1, n_kv, T, hd] of positions [start, start + T), all past the prompt."""
        if start < self.base:
            raise VeridraftError(
                f"cannot write position {start} into a cache compacted at {self.base}"
            )
        self.low_water = min(self.low_water, start)
        t = k.shape[2]
        for h in range(k.shape[1]):
            r = self._rows(layer, h, start, t)
            self.k[layer][r] = k[0, h]
            self.v[layer][r] = v[0, h]

    def keep(self, start: int, rows: list[int]) -> None:
        """KVCache.keep over every head's new-token rows (a token tree's accepted path)."""
        if any(r < start + i for i, r in enumerate(rows)) or rows != sorted(set(rows)):
            raise ValueError(f"keep: rows {rows} must increase and lie at or after {start}")
        moved = [(start + i, r) for i, r in enumerate(rows) if r != start + i]
        if not moved:
            return
        self.low_water = min(self.low_water, moved[0][0])
        for layer in range(len(self.k)):
            for h in range(len(self.off[layer])):
                base = self.off[layer][h] + self.n[layer][h] - self.base
                dst = torch.tensor([base + d for d, _ in moved])
                src = torch.tensor([base + s for _, s in moved])
                self.k[layer].index_copy_(0, dst, self.k[layer].index_select(0, src))
                self.v[layer].index_copy_(0, dst, self.v[layer].index_select(0, src))

    # -- memory --

    def nbytes(self) -> int:
        """Bytes held in memory: the buffers (kept rows and room) and the chunk keys."""
        held = sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
        return held + sum(d.rep.numel() * d.rep.element_size() for d in self.dynamic.values())

    def tier_bytes(self) -> int:
        """Bytes in the slow tier (memory-mapped files), 0 without dynamic heads."""
        return sum(2 * d.k.numel() * d.k.element_size() for d in self.dynamic.values())

    def kept_rows(self) -> int:
        return sum(sum(heads) for heads in self.n)

    # -- attention --

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, step, layer: int, scale: float, softcap
    ) -> Tensor:
        """models.base.attend for this layout: write k, v, attend q [1, n_h, T, hd]."""
        span = step.spans[layer]
        if span.index is not None or span.window is not None:
            raise VeridraftError(
                "a compacted KV cache takes no view= and no sliding-window layer; use a drafter "
                "without a sparse view, or a model without sliding-window attention"
            )
        start, t = step.start, step.t
        self.write(layer, start, k, v)
        d = start + t - self.base  # new-token rows, these T included
        # the span's mask covers keys [0, start + T); the kept prompt rows are all visible. A
        # contiguous forward of several rows carries no mask, only `causal` (the full-cache path
        # attends it in tiles): build the causal rule over the new-token rows here.
        mask = span.mask
        if mask is None and span.causal and t > 1:
            kpos, qpos = torch.arange(start + t), torch.arange(start, start + t)
            mask = kpos[None, :] <= qpos[:, None]
        dec_mask = None if mask is None else mask[:, self.base :]
        n_kv = k.shape[1]
        g = q.shape[1] // n_kv
        if self.uniform[layer]:
            n = self.n[layer][0]
            kb = self.k[layer].view(n_kv, -1, k.shape[-1])[None, :, : n + d]
            vb = self.v[layer].view(n_kv, -1, k.shape[-1])[None, :, : n + d]
            return _attend(q, kb, vb, _full_mask(dec_mask, n), scale, softcap)
        out = []
        for h in range(n_kv):
            qh = q[:, h * g : (h + 1) * g]
            o, n = self.off[layer][h], self.n[layer][h]
            kb, vb = self.k[layer][o : o + n + d], self.v[layer][o : o + n + d]
            tier = self.dynamic.get((layer, h))
            if tier is None:
                out.append(
                    _attend(
                        qh, kb[None, None], vb[None, None], _full_mask(dec_mask, n), scale, softcap
                    )
                )
                continue
            # a dynamic head: each query row retrieves its own chunks, so a verification
            # forward's row reads what a one-token forward at its position would
            rows = []
            for i in range(t):
                idx = tier.rows(qh[0, :, i], scale)
                seen = d - t + i + 1 if dec_mask is None else int(dec_mask[i].sum())
                dk = kb if dec_mask is None else kb[dec_mask[i]]
                dv = vb if dec_mask is None else vb[dec_mask[i]]
                keys = torch.cat((tier.k.index_select(0, idx).to(kb.dtype), dk[:seen]))
                vals = torch.cat((tier.v.index_select(0, idx).to(vb.dtype), dv[:seen]))
                rows.append(
                    _attend(
                        qh[:, :, i : i + 1],
                        keys[None, None],
                        vals[None, None],
                        None,
                        scale,
                        softcap,
                    )
                )
            out.append(torch.cat(rows, 0))
        return torch.cat(out, 1)


def _full_mask(dec_mask: Tensor | None, n: int) -> Tensor | None:
    if dec_mask is None:
        return None
    return torch.cat((torch.ones(dec_mask.shape[0], n, dtype=torch.bool), dec_mask), 1)
