"""Preallocated KV cache with O(1) rollback.

One tensor pair per layer, shaped [1, n_kv_heads, max_len, head_dim]. Forward passes write the
keys and values of new positions at [length, length + T) and advance `length`; `truncate(n)`
only moves the length back, so rejecting draft tokens costs nothing.
"""

from __future__ import annotations

import torch

from .errors import VeridraftError


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (1, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0
        # lowest position written since the last mark(): lets the decode loop check in O(1)
        # that a drafter wrote nothing below the committed length
        self.low_water = max_len

    def __len__(self) -> int:
        return self.length

    def reserve(self, n_new: int) -> int:
        """Check that n_new more positions fit; return the start position for them."""
        if self.length + n_new > self.max_len:
            raise VeridraftError(
                f"KV cache full: {self.length} + {n_new} positions exceed its {self.max_len}; "
                "allocate a larger cache (max_len) or shorten the prompt / max_new_tokens"
            )
        return self.length

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v of shape [1, n_kv, T, hd] at positions [start, start + T)."""
        t = k.shape[2]
        if start < self.low_water:
            self.low_water = start
        self.k[layer][:, :, start : start + t] = k
        self.v[layer][:, :, start : start + t] = v

    def note_write(self, start: int) -> None:
        """Record a write at positions from `start` made without `write` (the fused forward
        writes each layer's rows itself)."""
        if start < self.low_water:
            self.low_water = start

    def mark(self) -> None:
        """Start watching writes afresh (see low_water)."""
        self.low_water = self.max_len

    def advance(self, n: int) -> None:
        self.length += n

    def keep(self, start: int, rows: list[int]) -> None:
        """Copy the positions `rows` (increasing, each >= its destination) down to start,
        start + 1, ...: a tree's accepted path becomes consecutive positions. Rows already in
        place are not copied, so a chain costs nothing."""
        if any(r < start + i for i, r in enumerate(rows)) or rows != sorted(set(rows)):
            raise ValueError(f"keep: rows {rows} must increase and lie at or after {start}")
        moved = [(start + i, r) for i, r in enumerate(rows) if r != start + i]
        if not moved:
            return
        dst = torch.tensor([d for d, _ in moved])
        src = torch.tensor([s for _, s in moved])
        if int(dst.min()) < self.low_water:
            self.low_water = int(dst.min())
        for layer in range(len(self.k)):
            # index_select copies first, so overlapping source and destination rows are safe
            self.k[layer].index_copy_(2, dst, self.k[layer].index_select(2, src))
            self.v[layer].index_copy_(2, dst, self.v[layer].index_select(2, src))

    def truncate(self, n: int) -> None:
        """Forget every position at index >= n (O(1): the memory is reused)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {n}")
        self.length = n
