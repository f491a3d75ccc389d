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
positions in a smaller buffer. Rows are copied once, in the full cache's element type (bfloat16
where the packed modes keep it so), never recomputed or re-rotated, so every kept row is bitwise
the full cache's row.

Attention. A query row reads every kept row of its head, then the new-token rows it may see: its
own position and those before it (a chain), or its ancestors (a token tree). In forwards of up
to ROWWISE_MAX_T rows each row reads exactly the key sequence, through the same call, that a
one-token forward at its position reads, so it is bitwise that forward's row and speculation on
the compressed target is exactly its plain decoding in the batch-invariant (packed) modes:
veridraft's decode attention kernel (models/attnkernel.cpp, row-invariant by construction) in
one call per layer for uniform layouts, one per KV head for head-wise ones and one per row for
dynamic heads; without the kernel, one torch call per row. When every layer keeps one count per
head, the fused q4 forward runs on the buffers as they are (`fused_view`), with the same calls.

Dynamic heads (HybridKV) keep no prompt rows here: their full prompt K/V live in a slower tier
(a memory-mapped file) and each query row retrieves its top chunks from it (see `Tier`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

from ..cache import KVCache
from ..errors import VeridraftError
from ..models import attnkernel
from ..models.attention import KERNEL, ROWS, attend_keys, kernel_keys


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

    def keys(
        self, q: Tensor, scale: float, kb: Tensor, vb: Tensor, n: int, new: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One query row's keys and values [m, hd] on this head: the chunks its group q [g, hd]
        retrieves, then its new-token rows `new` (rows n + new of the head's buffer kb, vb; a
        slice when they are the first ones, as for every row of a chain)."""
        idx = self.rows(q, scale)
        m = len(new)
        if m == 0 or int(new[-1]) == m - 1:
            dk, dv = kb[n : n + m], vb[n : n + m]
        else:
            dk, dv = kb.index_select(0, new + n), vb.index_select(0, new + n)
        keys = torch.cat((self.k.index_select(0, idx).to(kb.dtype), dk))
        return keys, torch.cat((self.v.index_select(0, idx).to(vb.dtype), dv))


def mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
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
        self._memo: tuple | None = None  # the last forward's row keys (_row_keys)
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
        self._fused = None
        if all(self.uniform) and len({heads[0] for heads in self.n}) == 1:
            n_kv = len(self.n[0])
            plain = SimpleNamespace(
                k=[b.view(1, n_kv, -1, hd) for b in self.k],
                v=[b.view(1, n_kv, -1, hd) for b in self.v],
            )
            self._fused = (self.n[0][0] - self.base, self._plain_keys, plain)

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

    def note_write(self, start: int) -> None:
        """Record a write from `start` made without `write` (the fused forward's own)."""
        self.low_water = min(self.low_water, start)

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
        """models.attention.attend for this layout: write k, v [1, n_kv, T, hd], attend q
        [1, n_h, T, hd]; return [T, n_h * hd], along the path the forward plan chose
        (models/plan.py: KERNEL, ROWS or MASKED; it also refuses views and sliding windows here).

        Forwards of up to ROWWISE_MAX_T rows (decoding, verification, token trees) attend row
        by row in the sense of models/attention.py: each row reads exactly the keys a one-token
        forward at its position reads, through the same call, so its output is bitwise that
        forward's (what keeps speculation on a compressed target exactly its plain decoding in
        the batch-invariant modes). Where veridraft's decode attention kernel runs, one call per
        layer serves every row (per KV head for head-wise budgets, per row for dynamic heads);
        elsewhere, with rowwise attention (the packed modes), one torch call per row. Longer
        forwards (and fp32 without the kernel) keep one masked call."""
        span, path = step.spans[layer], step.paths[layer]
        self.write(layer, step.start, k, v)
        if path == KERNEL:
            return self._attend_kernel(q, self._row_keys(step, span), layer, scale, softcap)
        if path == ROWS:
            return self._attend_rows(q, self._row_keys(step, span), layer, scale, softcap)
        return self._attend_batched(q, step, span, layer, scale, softcap)

    def fused_view(self, start: int) -> tuple | None:
        """How the fused forward (models/fused.py) runs on this cache, when every layer keeps
        one count n of prompt rows per KV head: (shift, key ranges, plain), plain.k / plain.v
        each layer's buffer viewed as a plain cache [1, n_kv, n + room, hd] in which position
        p >= base sits at row p + shift (shift = n - base), and key ranges(step, span) the
        decode kernel's (lo, hi, ext) on it: the same calls as `attend` makes, so the two paths
        agree bitwise. None for head-wise layouts (they attend here, head by head) and for a
        forward from `start` that would write into the compressed prompt (`write` refuses
        it)."""
        return self._fused if start >= self.base else None

    def _plain_keys(self, step, span) -> tuple[Tensor, Tensor, Tensor | None]:
        n = self.n[0][0]
        hi, ext, _ = self._row_keys(step, span)
        e = None if ext is None else torch.where(ext >= 0, ext + n, -1)
        return torch.zeros(step.t, dtype=torch.long), hi + n, e

    def _row_keys(self, step, span) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        """The keys each query row reads past the compressed prompt, as new-token rows r
        (position base + r; every kept prompt row is read too): rows [0, hi[i]), then ext[0, i]
        (-1 = none; a token-tree node's ancestors), and per row the whole list. From the same
        key ranges the full cache gives the decode kernel (models.attention.kernel_keys), made once
        per forward."""
        # a span belongs to one forward (made per forward, shared by its layers); keeping it,
        # not the step, leaves no reference from this cache back to itself
        memo = self._memo
        if memo is not None and memo[0] is span:
            return memo[1]
        _, hi, ext = kernel_keys(step, span)
        hi = hi - self.base
        if ext is not None:
            ext = torch.where(ext >= 0, ext - self.base, -1)
        per_row = []
        for i in range(step.t):
            r = torch.arange(int(hi[i]))
            if ext is not None:
                e = ext[0, i]
                r = torch.cat((r, e[e >= 0]))
            per_row.append(r)
        keys = (hi, ext, per_row)
        self._memo = (span, keys)
        return keys

    def _attend_kernel(self, q, keys, layer: int, scale: float, softcap) -> Tensor:
        hi, ext, per_row = keys
        t, hd, n_kv = q.shape[2], q.shape[-1], len(self.off[layer])
        g = q.shape[1] // n_kv
        qf = q[0].float()
        lo = torch.zeros(t, dtype=torch.long)

        def heads_of(n: int, cap: int, kb: Tensor, vb: Tensor, qh: Tensor) -> Tensor:
            # kept rows [0, n) then the new-token rows: buffer rows n + r
            e = None if ext is None else torch.where(ext >= 0, ext + n, -1)
            kb, vb = kb.view(1, -1, cap, hd), vb.view(1, -1, cap, hd)
            return attnkernel.rows(qh, kb, vb, lo, hi + n, e, scale, softcap)

        if self.uniform[layer]:
            n = self.n[layer][0]
            cap = self.k[layer].shape[0] // n_kv
            return heads_of(n, cap, self.k[layer], self.v[layer], qf)
        out = []
        for h in range(n_kv):
            qh = qf[h * g : (h + 1) * g]
            o, n = self.off[layer][h], self.n[layer][h]
            end = self.off[layer][h + 1] if h + 1 < n_kv else self.k[layer].shape[0]
            kb, vb = self.k[layer][o:end], self.v[layer][o:end]
            tier = self.dynamic.get((layer, h))
            if tier is None:
                out.append(heads_of(n, end - o, kb, vb, qh))
                continue
            # a dynamic head: each row retrieves its own chunks from the slow tier, then reads
            # its new-token rows; one call per row, the same a one-token forward makes
            rows = []
            for i in range(t):
                ks, vs = tier.keys(qh[:, i], scale, kb, vb, n, per_row[i])
                m = torch.tensor([ks.shape[0]])
                rows.append(
                    attnkernel.rows(
                        qh[:, i : i + 1],
                        ks.view(1, 1, -1, hd),
                        vs.view(1, 1, -1, hd),
                        lo[:1],
                        m,
                        None,
                        scale,
                        softcap,
                    )
                )
            out.append(torch.cat(rows, 0))
        return torch.cat(out, 1)

    def _attend_rows(self, q, keys, layer: int, scale: float, softcap) -> Tensor:
        """Without the kernel: one torch call per row, in the call shape of a one-token forward
        (models.attention.attend's ROWS path)."""
        _, _, per_row = keys
        n_kv, hd = len(self.off[layer]), q.shape[-1]
        g = q.shape[1] // n_kv
        if self.uniform[layer]:
            n = self.n[layer][0]
            kb = self.k[layer].view(1, n_kv, -1, hd)
            vb = self.v[layer].view(1, n_kv, -1, hd)
            rows = []
            for i, r in enumerate(per_row):
                ks, vs = _rows_of(kb, vb, n, r)
                rows.append(attend_keys(q[:, :, i : i + 1], ks, vs, None, scale, softcap))
            return torch.cat(rows, 0)
        out = []
        for h in range(n_kv):
            qh = q[:, h * g : (h + 1) * g]
            o, n = self.off[layer][h], self.n[layer][h]
            end = self.off[layer][h + 1] if h + 1 < n_kv else self.k[layer].shape[0]
            kb, vb = self.k[layer][o:end], self.v[layer][o:end]
            tier = self.dynamic.get((layer, h))
            rows = []
            for i, r in enumerate(per_row):
                if tier is None:
                    ks, vs = _rows_of(kb[None, None], vb[None, None], n, r)
                else:
                    ks, vs = tier.keys(qh[0, :, i], scale, kb, vb, n, r)
                    ks, vs = ks[None, None], vs[None, None]
                rows.append(attend_keys(qh[:, :, i : i + 1], ks, vs, None, scale, softcap))
            out.append(torch.cat(rows, 0))
        return torch.cat(out, 1)

    def _attend_batched(self, q, step, span, layer: int, scale: float, softcap) -> Tensor:
        """Every row in one masked call per layout (long forwards; fp32 without the kernel)."""
        start, t = step.start, step.t
        d = start + t - self.base  # new-token rows, these T included
        # the span's mask covers keys [0, start + T); the kept prompt rows are all visible. A
        # contiguous forward of several rows carries no mask, only `causal` (the full-cache path
        # attends it in tiles): build the causal rule over the new-token rows here.
        mask = span.mask
        if mask is None and span.causal and t > 1:
            kpos, qpos = torch.arange(start + t), torch.arange(start, start + t)
            mask = kpos[None, :] <= qpos[:, None]
        dec_mask = None if mask is None else mask[:, self.base :]
        n_kv = len(self.off[layer])
        hd = q.shape[-1]
        g = q.shape[1] // n_kv
        if self.uniform[layer]:
            n = self.n[layer][0]
            kb = self.k[layer].view(n_kv, -1, hd)[None, :, : n + d]
            vb = self.v[layer].view(n_kv, -1, hd)[None, :, : n + d]
            return attend_keys(q, kb, vb, _full_mask(dec_mask, n), scale, softcap)
        out = []
        for h in range(n_kv):
            qh = q[:, h * g : (h + 1) * g]
            o, n = self.off[layer][h], self.n[layer][h]
            kb, vb = self.k[layer][o : o + n + d], self.v[layer][o : o + n + d]
            tier = self.dynamic.get((layer, h))
            if tier is None:
                out.append(
                    attend_keys(
                        qh, kb[None, None], vb[None, None], _full_mask(dec_mask, n), scale, softcap
                    )
                )
                continue
            # a dynamic head: each query row retrieves its own chunks
            rows = []
            for i in range(t):
                seen = (
                    torch.arange(d - t + i + 1) if dec_mask is None else dec_mask[i].nonzero()[:, 0]
                )
                ks, vs = tier.keys(qh[0, :, i], scale, kb, vb, n, seen)
                rows.append(
                    attend_keys(
                        qh[:, :, i : i + 1], ks[None, None], vs[None, None], None, scale, softcap
                    )
                )
            out.append(torch.cat(rows, 0))
        return torch.cat(out, 1)


def _rows_of(kb: Tensor, vb: Tensor, n: int, r: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values [1, heads, n + len(r), hd] of one row: the kept rows [0, n), then the
    new-token rows r, a slice when they are the first len(r) (a chain), else gathered."""
    m = len(r)
    if m == 0 or int(r[-1]) == m - 1:
        return kb[:, :, : n + m], vb[:, :, : n + m]
    idx = torch.cat((torch.arange(n), r + n))
    return kb.index_select(2, idx), vb.index_select(2, idx)


def _full_mask(dec_mask: Tensor | None, n: int) -> Tensor | None:
    if dec_mask is None:
        return None
    return torch.cat((torch.ones(dec_mask.shape[0], n, dtype=torch.bool), dec_mask), 1)
