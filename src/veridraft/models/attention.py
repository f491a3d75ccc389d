"""Attention of one forward: which keys each layer reads (`Span`), the per-forward state handed
to every block (`Step`), and the paths a layer's rows can take (`attend` runs the one the
forward plan chose, models/plan.py), plus the attention statistics a forward can capture.

Paths (`Step.paths`, one per layer):
- KERNEL: veridraft's decode attention kernel (attnkernel.cpp), every row in one call, each
  bitwise what a one-token forward at its position computes;
- ROWS / TREE_ROWS: one torch call per row (a chain's, a token tree's), in a one-token forward's
  call shape;
- PROMPT_ROWS: a long forward's rows through the decode kernel, 64 rows a call;
- TILED: contiguous causal rows in tiles of PREFILL_TILE positions (no [T, L] mask);
- MASKED: one masked call over the span's keys (views, trees and single rows elsewhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cache import KVCache
from ..errors import VeridraftError
from ..tree import TreeAttn
from . import attnkernel

KERNEL, ROWS, TREE_ROWS, PROMPT_ROWS, TILED, MASKED = (
    "kernel",
    "rows",
    "tree_rows",
    "prompt_rows",
    "tiled",
    "masked",
)


@dataclass
class Capture:
    """Ask a forward for hidden states: layer i -> output of block i; -1 or n_layers -> final
    normed hidden. Filled in place: `hidden[layer]` is [T, dim].

    attn_rows = r > 0 also asks, for every attention layer that runs, the attention weights of
    the last r query rows, summed over those rows: `attn[layer]` is [n_heads, n_keys], columns
    in the order the layer read its keys (without a view: positions lo .. start+T-1, lo = 0 on
    global layers; with a view: the view's positions, then the forward's own rows); with
    `queries`, `query[layer]` holds those rows' rotated queries [n_heads, r, head_dim]. Computed
    only when asked, as a separate product: the forward's own output does not change."""

    hidden_layers: tuple[int, ...] = ()
    hidden: dict[int, Tensor] = field(default_factory=dict)
    # sparse-cache drafters read the attention of chosen rows: see _capture_attn in attend
    attn_rows: int = 0
    queries: bool = False
    attn: dict[int, Tensor] = field(default_factory=dict)
    query: dict[int, Tensor] = field(default_factory=dict)
    # KV compression (presses) reads the prefill's attention: see capture_press_attention
    press_rows: int = 0  # > 0: attention of the last press_rows query rows, summed [n_h, L]
    press_colsum: bool = False  # also the attention every key receives from all rows [n_h, L]
    # the prompt length L the statistics cover when it is prefilled in several forwards (a
    # chunked prefill: each adds its rows' share); 0 = the one forward's end
    press_len: int = 0
    press_window: dict[int, Tensor] = field(default_factory=dict)
    press_last: dict[int, Tensor] = field(default_factory=dict)  # the last row's weights
    press_colsums: dict[int, Tensor] = field(default_factory=dict)
    press_input: dict[int, tuple[float, float]] = field(
        default_factory=dict
    )  # attn input mean, std
    # per layer, per forward so far: (rows, mean, std) of the attention input (press_input)
    press_input_parts: dict[int, list[tuple[int, float, float]]] = field(default_factory=dict)


@dataclass
class Span:
    """Which keys one layer's queries read in this forward."""

    lo: int  # first cached position read (contiguous case)
    index: Tensor | None  # explicit cached positions (a view) instead of [lo, start)
    mask: Tensor | None  # [T, L] bool, True = may attend; None = every key allowed
    window: int | None = None  # sliding window of the layer (None = global)
    # contiguous rows start..start+T over keys [lo, start+T) with the causal (and window) rule:
    # attended in tiles (attend_tiled), never through one [T, L] mask
    causal: bool = False
    # the decode kernel's key ranges for these rows (kernel_keys), made once per forward
    kernel_keys: tuple | None = None


def first_key(pos: int, window: int | None) -> int:
    """The first cached position a query at `pos` reads (sliding window or global)."""
    return 0 if window is None else max(0, pos - window + 1)


def make_span(start: int, t: int, window: int | None, view: Tensor | None) -> Span:
    """view: cached positions [B] read by every head, or [n_kv_heads, B] one row per KV head
    (a per-head view; the same count B for each head)."""
    if view is None:
        lo = first_key(start, window)
        return Span(lo, None, None, window, causal=t > 1)
    view = view.to(torch.long)
    if view.dim() > 2:
        raise VeridraftError("a view is a [B] or [n_kv_heads, B] tensor of cached positions")
    if view.numel() and not 0 <= int(view.min()) <= int(view.max()) < start:
        raise VeridraftError(f"view positions must lie in [0, {start}) (the cached ones)")
    if t == 1 and window is None:  # one query after every viewed key: nothing to mask
        return Span(0, view, None, window)
    qpos = torch.arange(start, start + t)
    if view.dim() == 2:  # per KV head: kpos [n_kv, 1, B + T], the mask [n_kv, T, B + T]
        kpos = torch.cat((view, qpos.expand(view.shape[0], t)), 1)[:, None, :]
    else:
        kpos = torch.cat((view, qpos))[None, :]
    allowed = kpos <= qpos[:, None]
    if window is not None:
        allowed &= kpos > qpos[:, None] - window
    return Span(0, view, None if bool(allowed.all()) else allowed, window)


def make_tree_span(start: int, tree: TreeAttn, window: int | None) -> Span:
    """Keys [lo, start + T): the cached prefix, then the tree rows as written (row r at
    start + r); a row sees the prefix, the root and its ancestors, within its window measured
    from its own position start + depth."""
    lo = first_key(start, window)
    t = tree.mask.shape[0]
    qpos = start + tree.depth
    kpos = torch.cat((torch.arange(lo, start), qpos))
    allowed = torch.cat((torch.ones(t, start - lo, dtype=torch.bool), tree.mask), dim=1)
    if window is not None:
        allowed &= kpos[None, :] > qpos[:, None] - window
    return Span(lo, None, allowed, window)


@dataclass
class Step:
    """Per-forward state handed to every block."""

    cache: KVCache
    start: int
    t: int
    rope: list[tuple[Tensor, Tensor]]  # per rope setting: cos, sin [T, 1, hd]
    spans: list[Span | None]  # per layer
    rowwise: bool = False  # attend query row by row (see Transformer.rowwise_attention)
    tree: TreeAttn | None = None  # rows are token-tree nodes (tree.py), not a chain
    capture: Capture | None = None  # attention to report (attn_rows / press_rows)
    tree_keys: dict = field(default_factory=dict)  # window -> per-row keys (_tree_row_keys)
    # per layer, the attention path the forward plan chose (models/plan.py; None: skipped)
    paths: list[str | None] = field(default_factory=list)


# Row-wise attention covers verification forwards (a draft plus one token); longer forwards are
# prefills, which plain and speculative decoding run alike, so they keep the batched kernel.
ROWWISE_MAX_T = 64


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    step: Step,
    layer: int,
    scale: float,
    softcap: float | None = None,
) -> Tensor:
    """Write k, v [1, n_kv, T, hd] into the cache, attend q [1, n_h, T, hd]; return [T, n_h*hd],
    along the path the forward plan chose for this layer (step.paths)."""
    cache, start, t = step.cache, step.start, step.t
    span, path = step.spans[layer], step.paths[layer]
    if hasattr(cache, "attend"):  # a compacted (lossy) cache attends over its own layout
        return cache.attend(q, k, v, step, layer, scale, softcap)
    cache.write(layer, start, k, v)
    k, v = k.to(cache.k[layer].dtype), v.to(cache.v[layer].dtype)
    if span.index is not None and (path != KERNEL or step.capture is not None):
        keys, vals = _view_keys(cache, layer, span.index, k, v)
    if step.capture is not None and step.capture.attn_rows > 0:
        mask = span.mask
        if span.index is None:
            keys = cache.k[layer][:, :, span.lo : start + t]
            if mask is None and span.causal:  # the tiled path builds no mask: the rows need one
                kpos, qpos = torch.arange(span.lo, start + t), torch.arange(start, start + t)
                mask = kpos[None, :] <= qpos[:, None]
                if span.window is not None:
                    mask &= kpos[None, :] > qpos[:, None] - span.window
        _capture_attn(q, keys, mask, scale, softcap, step.capture, layer)
    if path == KERNEL:
        # Every row in one call, each bitwise what a one-token forward at its position gives
        # (attnkernel.cpp): decoding, verification, trees and views alike.
        lo, hi, ext = kernel_keys(step, span)
        kc, vc = cache.k[layer], cache.v[layer]
        return attnkernel.rows(q[0].float(), kc, vc, lo, hi, ext, scale, softcap)
    if path == TREE_ROWS:
        return _attend_tree_rows(q, step, layer, span.window, scale, softcap)
    if path == ROWS:
        # Row i reads exactly the keys, in the same call shape, as a one-token forward at
        # position start+i would: bitwise the same output as plain decoding.
        rows = []
        for i in range(t):
            pos = start + i
            lo = first_key(pos, span.window)
            rows.append(
                attend_keys(
                    q[:, :, i : i + 1],
                    cache.k[layer][:, :, lo : pos + 1],
                    cache.v[layer][:, :, lo : pos + 1],
                    None,
                    scale,
                    softcap,
                )
            )
        return torch.cat(rows, 0)
    if path == PROMPT_ROWS:
        kc, vc = cache.k[layer], cache.v[layer]
        return attend_prompt_rows(q, kc, vc, start, span.window, scale, softcap)
    if path == TILED:
        return attend_tiled(q, cache, layer, start, span.window, scale, softcap)
    if span.index is None:  # MASKED
        keys = cache.k[layer][:, :, span.lo : start + t]
        vals = cache.v[layer][:, :, span.lo : start + t]
    return attend_keys(q, keys, vals, span.mask, scale, softcap)


def decode_kernel(cache: KVCache, layer: int, head_dim: int) -> bool:
    """Whether this layer's rows can go through veridraft's decode attention kernel: a float32
    or bfloat16 cache laid out contiguously, head_dim up to 256, the kernel built."""
    kc = cache.k[layer]
    return (
        head_dim <= 256
        and kc.dtype in (torch.float32, torch.bfloat16)
        and kc.is_contiguous()
        and attnkernel.load() is not None
    )


def kernel_keys(step: Step, span: Span) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per query row, the keys it reads as the kernel takes them: cached positions [lo, hi),
    then ext (positions, -1 = none). A chain row reads [first key, itself]; a tree node its
    prefix and then its ancestors (a node on the chain of first rows: the chain's slice, so
    its keys are those of plain decoding); a view row its own new rows, then the viewed ones."""
    if span.kernel_keys is not None:
        return span.kernel_keys
    start, t, window = step.start, step.t, span.window
    ext = None
    if step.tree is not None:
        depth = step.tree.depth.tolist()
        lo, hi, news = [], [], []
        for i, anc in enumerate(step.tree.rows):
            pos = start + depth[i]
            first = first_key(pos, window)
            if anc == list(range(depth[i] + 1)):
                lo.append(first), hi.append(pos + 1), news.append([])
            else:
                lo.append(min(first, start)), hi.append(start)
                news.append([start + r for r in anc if start + depth[r] >= first])
        width = max(len(n) for n in news)
        if width:
            ext = torch.full((1, t, width), -1, dtype=torch.long)
            for i, n in enumerate(news):
                ext[0, i, : len(n)] = torch.tensor(n, dtype=torch.long)
        lo_t, hi_t = torch.tensor(lo, dtype=torch.long), torch.tensor(hi, dtype=torch.long)
    else:
        qpos = torch.arange(start, start + t)
        hi_t = qpos + 1
        lo_t = qpos - window + 1 if window is not None else torch.zeros(t, dtype=torch.long)
        lo_t = lo_t.clamp(min=0)
        if span.index is not None:
            lo_t = lo_t.clamp(min=start)
            view = (span.index if span.index.dim() == 2 else span.index[None]).contiguous()
            ext = view[:, None, :].expand(view.shape[0], t, view.shape[1])
            if window is not None:
                ext = torch.where(ext > (qpos - window)[None, :, None], ext, -1)
            ext = ext.contiguous() if window is not None else view[:, None, :]
    span.kernel_keys = (lo_t, hi_t, ext)
    return span.kernel_keys


def _view_keys(cache: KVCache, layer: int, index: Tensor, k: Tensor, v: Tensor):
    """The viewed cached keys/values, then this forward's own: [1, n_kv, B + T, hd] each (a
    copy of B rows per head; the cache is only read)."""
    ck, cv = cache.k[layer], cache.v[layer]
    n_kv, max_len, hd = ck.shape[1], ck.shape[2], ck.shape[3]
    # one row gather over the flattened [n_kv * max_len, hd] cache: ~20x faster on a CPU than
    # index_select/gather along dim 2; row h of a per-head index picks head h's positions
    flat = (torch.arange(n_kv)[:, None] * max_len + index).flatten()
    b = flat.numel() // n_kv
    sk = ck.reshape(-1, hd).index_select(0, flat).view(1, n_kv, b, hd)
    sv = cv.reshape(-1, hd).index_select(0, flat).view(1, n_kv, b, hd)
    return torch.cat((sk, k), dim=2), torch.cat((sv, v), dim=2)


def _capture_attn(
    q: Tensor, keys: Tensor, mask: Tensor | None, scale: float, softcap, cap: Capture, layer: int
) -> None:
    """Attention weights of the last cap.attn_rows query rows over `keys`, summed over the rows
    (an explicit product, outside the forward's own attention)."""
    n_h, t = q.shape[1], q.shape[2]
    r = min(cap.attn_rows, t)
    n_kv = keys.shape[1]
    rows = q[0, :, t - r :]  # [n_h, r, hd]
    g = n_h // n_kv
    rows = rows.float()
    scores = rows.reshape(n_kv, g * r, -1) @ keys[0].float().transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(n_h, r, -1)
    if mask is not None:
        m = mask[..., t - r :, :]
        if m.dim() == 3:  # per KV head -> per query head
            m = m.repeat_interleave(g, 0)
        scores = scores.masked_fill(~m, float("-inf"))
    cap.attn[layer] = scores.softmax(-1).sum(1)
    if cap.queries:
        cap.query[layer] = rows.clone()


def _attend_tree_rows(
    q: Tensor, step: Step, layer: int, window: int | None, scale: float, softcap
) -> Tensor:
    """Row-wise attention over a token tree: row i reads the cached prefix in its window and its
    ancestors, in position order, in the call shape of a one-token forward at its position. A
    node on a chain-shaped path reads the same contiguous slice as plain decoding would."""
    cache = step.cache
    out = []
    for i, (lo, hi, idx) in enumerate(_tree_row_keys(step, window)):
        if idx is None:
            keys = cache.k[layer][:, :, lo:hi]
            vals = cache.v[layer][:, :, lo:hi]
        else:
            keys = cache.k[layer].index_select(2, idx)
            vals = cache.v[layer].index_select(2, idx)
        out.append(attend_keys(q[:, :, i : i + 1], keys, vals, None, scale, softcap))
    return torch.cat(out, 0)


# Prefill rows are attended in tiles that start at multiples of this many positions: a chunked
# prefill whose chunks are multiples of it makes the same kernel calls as a one-block prefill
# (bitwise the same cache), and no [T, L] mask or score matrix is ever built.
PREFILL_TILE = 512
_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend_tiled(
    q: Tensor, cache: KVCache, layer: int, start: int, window: int | None, scale: float, softcap
) -> Tensor:
    """Rows start..start+T, each over the cached keys up to itself (within its window).

    A tile [a, b) of a global layer is two flash calls merged by their log-sum-exp: the keys
    before a, all visible (no mask), and the square [a, b) with is_causal (SDPA's causal mask is
    aligned top-left, right for a square). Its cost follows the FLOPs of causal attention: one
    [T, L] masked call took 1.7x as long at T = 2k and 2x at 4k (docs/performance/amd-epyc-zen5.md) and holds
    the mask. Sliding-window layers (and softcap) take one masked call per tile over the
    window's keys only, a [tile, tile + window] mask; so does a verification forward (T <= 64),
    for which one small call beats two and a merge. (Where the decode kernel takes prompts, the
    plan picks attend_prompt_rows instead.)"""
    t = q.shape[2]
    kc, vc = cache.k[layer], cache.v[layer]
    q = q.to(kc.dtype)
    outs = []
    a = start
    while a < start + t:
        b = min(start + t, (a // PREFILL_TILE + 1) * PREFILL_TILE)
        if t <= ROWWISE_MAX_T:  # a verification forward: one small masked call is cheaper
            b = start + t
        qt = q[:, :, a - start : b - start]
        if window is None and softcap is None and _flash is not None and t > ROWWISE_MAX_T:
            o, lse = _flash(qt, kc[:, :, a:b], vc[:, :, a:b], 0.0, True, scale=scale)
            if a > 0:
                o0, lse0 = _flash(qt, kc[:, :, :a], vc[:, :, :a], 0.0, False, scale=scale)
                top = torch.maximum(lse, lse0)
                w, w0 = (lse - top).exp().unsqueeze(-1), (lse0 - top).exp().unsqueeze(-1)
                o = (o.float() * w + o0.float() * w0) / (w + w0)
            outs.append(o[0].transpose(0, 1).reshape(b - a, -1).float())
        else:
            lo = first_key(a, window)
            qpos, kpos = torch.arange(a, b), torch.arange(lo, b)
            allowed = kpos[None, :] <= qpos[:, None]
            if window is not None:
                allowed &= kpos[None, :] > qpos[:, None] - window
            outs.append(attend_keys(qt, kc[:, :, lo:b], vc[:, :, lo:b], allowed, scale, softcap))
        a = b
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def attend_prompt_rows(
    q: Tensor, kc: Tensor, vc: Tensor, start: int, window: int | None, scale: float, softcap
) -> Tensor:
    """Prompt rows through the decode attention kernel (attnkernel.for_prompts), ROWWISE_MAX_T
    rows a call: each row is what a one-token step at its position computes, so a prompt's
    rows do not depend on how it is chunked either. The slices bound the kernel's partial
    results (rows x heads x blocks) at long contexts."""
    t = q.shape[2]
    qf = q[0].float()  # [n_h, T, hd]
    outs = []
    for a in range(0, t, ROWWISE_MAX_T):
        b = min(t, a + ROWWISE_MAX_T)
        pos = torch.arange(start + a, start + b)
        lo = (pos - window + 1).clamp(min=0) if window is not None else torch.zeros_like(pos)
        outs.append(attnkernel.rows(qf[:, a:b], kc, vc, lo, pos + 1, None, scale, softcap))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def _tree_row_keys(step: Step, window: int | None) -> list[tuple[int, int, Tensor | None]]:
    """Per tree row: the key slice [lo, hi) when its keys are contiguous, else an index tensor.
    Computed once per forward and window, not per layer: building the index in Python for every
    layer cost more than the attention itself."""
    memo = step.tree_keys.get(window)
    if memo is not None:
        return memo
    start, tree = step.start, step.tree
    depth = tree.depth.tolist()
    memo = []
    for i, anc in enumerate(tree.rows):
        pos = start + depth[i]
        lo = first_key(pos, window)
        # ancestors sit at rows 0..depth exactly when the path is the chain of first rows
        if anc == list(range(depth[i] + 1)):
            memo.append((lo, pos + 1, None))
            continue
        news = [start + r for r in anc if start + depth[r] >= lo]
        idx = torch.cat((torch.arange(lo, start), torch.tensor(news, dtype=torch.long)))
        memo.append((lo, pos + 1, idx))
    step.tree_keys[window] = memo
    return memo


def attend_keys(
    q: Tensor, keys: Tensor, vals: Tensor, mask: Tensor | None, scale: float, softcap
) -> Tensor:
    """q [1, n_h, T, hd] over the given keys and values [1, n_kv, L, hd] in one torch call
    (SDPA, or an explicit softmax with softcap), mask [T, L] or per KV head [n_kv, T, L];
    returns [T, n_h * hd] float32. One row with GQA reads each KV head once."""
    t = q.shape[2]
    if mask is not None and mask.dim() == 3:  # a per-KV-head mask -> per query head
        mask = mask.repeat_interleave(q.shape[1] // keys.shape[1], 0)
    q = q.to(keys.dtype)
    if softcap is None and t == 1 and mask is None and q.shape[1] != keys.shape[1]:
        # One row with GQA: the q heads sharing a kv head become that head's query rows, so the
        # cache is read once per kv head with no repeat_interleave copy (enable_gqa on one row
        # is 1.3x slower in float32 and 8x in bfloat16 on a Zen 5 core).
        n_h, n_kv = q.shape[1], keys.shape[1]
        out = F.scaled_dot_product_attention(
            q.reshape(1, n_kv, n_h // n_kv, q.shape[-1]), keys, vals, scale=scale
        )
        return out.reshape(1, -1).float()
    if softcap is None:
        out = F.scaled_dot_product_attention(
            q, keys, vals, attn_mask=mask, scale=scale, enable_gqa=True
        )
    else:  # SDPA cannot softcap the scores
        groups = q.shape[1] // keys.shape[1]
        keys, vals = keys.repeat_interleave(groups, 1), vals.repeat_interleave(groups, 1)
        scores = torch.tanh(q @ keys.transpose(-1, -2) * scale / softcap) * softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.softmax(-1) @ vals
    return out[0].transpose(0, 1).reshape(t, -1).float()


def capture_press_attention(
    x: Tensor, q: Tensor, step: Step, layer: int, scale: float, softcap: float | None
) -> None:
    """What KV-compression policies read from a prefill on a full cache: per layer, the
    softmax attention of the last `press_rows` prompt rows summed over those rows, the last
    row's weights, optionally the attention each key receives from every row (H2O), and the
    mean/std of the attention input (MM-ShiftKV's probes). Computed here, only when asked, as a
    float32 product of the rotated queries and the cached keys (a bfloat16 cache widened), so
    that plain forwards never materialise attention weights and the forward's own attention
    (tiled, row-wise or the decode kernel) is what it would be without the capture.

    A prompt prefilled in chunks (decode.run_prompt, with cap.press_len its length L) adds
    each forward's share: its rows among the last press_rows, its rows' column sums, its input
    statistics; every sum has L columns (a row's keys end at itself, the rest stay zero)."""
    cap, cache, start, t = step.capture, step.cache, step.start, step.t
    total = max(cap.press_len, start + t)
    keys = cache.k[layer][0, :, : start + t].float()  # [n_kv, start + t, hd]
    n_h = q.shape[1]
    keys = keys.repeat_interleave(n_h // keys.shape[0], 0)
    kpos = torch.arange(start + t)
    q = q.float()

    def weights(lo: int, hi: int) -> Tensor:  # softmax of query rows [lo, hi): [n_h, rows, L]
        s = q[0, :, lo:hi] @ keys.transpose(-1, -2) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        causal = kpos[None, :] > torch.arange(start + lo, start + hi)[:, None]
        return s.masked_fill(causal, float("-inf")).softmax(-1)

    def add(into: dict[int, Tensor], part: Tensor) -> None:
        if layer not in into and part.shape[-1] == total:
            into[layer] = part
            return
        acc = into.setdefault(layer, torch.zeros(n_h, total))
        acc[:, : part.shape[-1]] += part

    first = max(0, total - cap.press_rows - start)  # this forward's rows in the window
    if first < t:
        w = weights(first, t)
        add(cap.press_window, w.sum(1))
        if start + t == total:
            cap.press_last[layer] = w[:, -1].clone()
    if cap.press_colsum:
        col = torch.zeros(n_h, start + t)
        for lo in range(0, t, 512):  # bounded memory: 512 rows at a time
            col += weights(lo, min(t, lo + 512)).sum(1)
        add(cap.press_colsums, col)
    parts = cap.press_input_parts.setdefault(layer, [])
    parts.append((x.numel(), float(x.mean()), float(x.std())))
    cap.press_input[layer] = pooled_mean_std(parts)


def pooled_mean_std(parts: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Mean and (unbiased) std of the union of groups given as (count, mean, std); one group
    gives its own values back."""
    if len(parts) == 1:
        return parts[0][1], parts[0][2]
    n = sum(c for c, _, _ in parts)
    mean = sum(c * m for c, m, _ in parts) / n
    ss = sum((c - 1) * sd * sd + c * (m - mean) ** 2 for c, m, sd in parts)
    return mean, math.sqrt(ss / max(1, n - 1))
