"""What every native architecture shares: the config, the forward driver, attention, RoPE, loading.

An architecture file (llama.py, gemma3.py) only defines its Block and how HF tensor names map
onto it; `Transformer.forward` here runs the contract (positions from the cache, skip, view,
capture, last-n logits) the same way for all of them.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import KVCache
from ..errors import VeridraftError
from ..tree import TreeAttn
from . import attnkernel
from .precision import PRECISIONS  # noqa: F401  (re-exported)

FULL, SLIDING = "full_attention", "sliding_attention"
SUPPORTED_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma3_text": "gemma3",
}


@dataclass
class ModelConfig:
    arch: str  # "llama" | "gemma3": which native implementation runs it
    model_type: str  # the HF model_type it came from
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    tie_embeddings: bool = False
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # FULL or SLIDING per layer
    # HF rope parameters per layer type: {"rope_type", "rope_theta", scaling keys...}
    rope: dict[str, dict[str, Any]] = field(default_factory=dict)
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    @property
    def layer_windows(self) -> list[int | None]:
        """Per layer: how many positions (itself included) a query sees, None = all."""
        return [self.sliding_window if t == SLIDING else None for t in self.layer_types]

    @property
    def rope_theta(self) -> float:
        return float(self.rope[FULL]["rope_theta"])

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Read an HF config.json dict (transformers 4 or 5 layout)."""
        mt = cfg.get("model_type")
        if mt == "gemma3" and isinstance(cfg.get("text_config"), dict):
            # the multimodal wrapper: run its language model only
            top = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
            cfg = {**cfg["text_config"], **top, "model_type": "gemma3_text"}
            mt = "gemma3_text"
        if mt not in SUPPORTED_MODEL_TYPES:
            raise VeridraftError(
                f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        gemma = mt == "gemma3_text"
        try:
            dim, n_layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
            n_heads = int(cfg["num_attention_heads"])
            n_kv_heads = int(cfg.get("num_key_value_heads") or n_heads)
            head_dim = int(cfg.get("head_dim") or dim // n_heads)
            vocab_size, inter = int(cfg["vocab_size"]), int(cfg["intermediate_size"])
        except KeyError as e:
            raise VeridraftError(f"config.json lacks {e.args[0]!r}; re-convert the model") from e
        if cfg.get("use_bidirectional_attention"):
            raise VeridraftError("bidirectional Gemma 3 (embedding models) is not supported")

        window = cfg.get("sliding_window")
        if mt in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        types = cfg.get("layer_types")
        if gemma and not types:
            pattern = int(cfg.get("sliding_window_pattern", 6))
            types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
        elif mt in ("qwen2", "qwen3") and window and not types:
            mwl = int(cfg.get("max_window_layers", n_layers))
            types = [SLIDING if i >= mwl else FULL for i in range(n_layers)]
        elif mt == "mistral":
            types = [SLIDING if window else FULL] * n_layers
        if not window or not types:
            window, types = None, [FULL] * n_layers
        if len(types) != n_layers or set(types) - {FULL, SLIDING}:
            raise VeridraftError(f"config.json layer_types not understood: {types}")

        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise VeridraftError(f"unsupported activation {act!r} (silu, gelu_pytorch_tanh)")
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        return cls(
            arch=SUPPORTED_MODEL_TYPES[mt],
            model_type=mt,
            vocab_size=vocab_size,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            intermediate_size=inter,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            hidden_act=act,
            qkv_bias=mt == "qwen2" or bool(cfg.get("attention_bias", False)),
            o_bias=mt != "qwen2" and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=mt in ("qwen3", "gemma3_text"),
            sliding_window=int(window) if window else None,
            layer_types=list(types),
            rope=_rope_params(cfg, gemma),
            attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None,
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
        )


def _rope_params(cfg: dict[str, Any], gemma: bool) -> dict[str, dict[str, Any]]:
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and (FULL in rp or SLIDING in rp):  # transformers 5, per layer type
        out = {FULL: dict(rp.get(FULL) or {}), SLIDING: dict(rp.get(SLIDING) or {})}
    elif isinstance(rp, dict):  # transformers 5, one set for all layers
        out = {FULL: dict(rp), SLIDING: dict(rp)}
    else:  # transformers 4: rope_theta (+ rope_local_base_freq) and rope_scaling
        scaling = dict(cfg.get("rope_scaling") or {})
        full = {**scaling, "rope_theta": cfg.get("rope_theta", 1e6 if gemma else 1e4)}
        local = {"rope_theta": cfg.get("rope_local_base_freq", 1e4)} if gemma else full
        out = {FULL: full, SLIDING: dict(local)}
    for p in out.values():
        p.setdefault("rope_theta", 1e4)
        p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
        if p["rope_type"] not in ("default", "linear", "llama3"):
            raise VeridraftError(
                f"unsupported rope_type {p['rope_type']!r} (default, linear, llama3)"
            )
    return out


@dataclass(frozen=True)
class Skip:
    """Sub-layers to bypass: the residual passes through, a skipped attention writes no KV."""

    attn: frozenset[int] = frozenset()
    mlp: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "attn", frozenset(self.attn))
        object.__setattr__(self, "mlp", frozenset(self.mlp))


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
    # sparse-cache drafters read the attention of chosen rows: see _capture_attn
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


# ---- numerics shared by the architectures ----


class RMSNorm(nn.Module):
    """x / rms(x) * weight. Gemma's (1 + w) is folded into `weight` at load, so one class serves."""

    kernel = None  # fused.cpp's elementwise steps, where the model runs the fused forward

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel is not None:
            return self.kernel.rmsnorm(x, self.weight, self.eps, 0)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def make_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """The one place linear layers are made, so a precision can later swap in packed weights."""
    return nn.Linear(in_features, out_features, bias=bias)


class GatedMLP(nn.Module):
    """w2(act(gate) * up), gate and up from one fused matmul: SwiGLU (Llama) or GeGLU (Gemma)."""

    kernel = None  # fused.cpp's steps (see RMSNorm); act_id names `act` to it
    act_id = 0

    def __init__(self, cfg: ModelConfig, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.act = act
        self.w13 = make_linear(cfg.dim, 2 * cfg.intermediate_size, cfg.mlp_bias)  # gate | up
        self.w2 = make_linear(cfg.intermediate_size, cfg.dim, cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel is not None:
            return self.w2(self.kernel.glu(self.w13(x), self.act_id))
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(self.act(gate) * up)


def _inv_freq(p: dict[str, Any], head_dim: int) -> Tensor:
    # same expression as transformers so the tables match it bit for bit
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv = 1.0 / (float(p["rope_theta"]) ** exps)
    if p["rope_type"] == "linear":
        inv = inv / p["factor"]
    elif p["rope_type"] == "llama3":
        factor, lo_f, hi_f = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo_f, inv / factor, inv)
        smooth = (old / wavelen - lo_f) / (hi_f - lo_f)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi_f) * ~(wavelen > old / lo_f)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class RopeTables:
    """cos/sin per position for each distinct rope setting, grown on demand (a 262k-position
    table for every Gemma theta would cost hundreds of MB that short contexts never touch)."""

    def __init__(self, params: list[dict[str, Any]], head_dim: int) -> None:
        with torch.device("cpu"):  # real tensors even when the model is built on "meta"
            self.inv_freq = [_inv_freq(p, head_dim) for p in params]
            self.cos: list[Tensor] = [torch.empty(0, 1, head_dim) for _ in params]
            self.sin: list[Tensor] = [torch.empty(0, 1, head_dim) for _ in params]

    def ensure(self, n: int) -> None:
        if n <= self.cos[0].shape[0]:
            return
        n = max(n, 2 * self.cos[0].shape[0], 256)
        pos = torch.arange(n, dtype=torch.int64).float()
        for j, inv in enumerate(self.inv_freq):
            freqs = pos[:, None] * inv[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
            # sin with rotate_half's sign folded in: rotate_half(x) * sin == roll(x) * sin'
            sin = emb.sin()
            half = sin.shape[-1] // 2
            sin[..., :half].neg_()
            self.cos[j], self.sin[j] = emb.cos(), sin

    def get(self, j: int, start: int, t: int) -> tuple[Tensor, Tensor]:
        """cos, signed sin [T, 1, hd] for positions start..start+t (see apply_rope)."""
        self.ensure(start + t)
        return self.cos[j][start : start + t], self.sin[j][start : start + t]

    def at(self, j: int, pos: Tensor) -> tuple[Tensor, Tensor]:
        """cos, signed sin [T, 1, hd] for arbitrary positions (a token tree's start + depth)."""
        self.ensure(int(pos.max()) + 1)
        return self.cos[j][pos], self.sin[j][pos]


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x [T, heads, hd] in the HF half-split layout (q and k rotated in one call):
    x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) = roll(x) * (-1, 1); the
    sign lives in the table, so this is three kernels instead of seven."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


@dataclass
class Span:
    """Which keys one layer's queries read in this forward."""

    lo: int  # first cached position read (contiguous case)
    index: Tensor | None  # explicit cached positions (a view) instead of [lo, start)
    mask: Tensor | None  # [T, L] bool, True = may attend; None = every key allowed
    window: int | None = None  # sliding window of the layer (None = global)
    # contiguous rows start..start+T over keys [lo, start+T) with the causal (and window) rule:
    # attended in tiles (_attend_causal), never through one [T, L] mask
    causal: bool = False
    # the decode kernel's key ranges for these rows (_kernel_keys), made once per forward
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
    """Write k, v [1, n_kv, T, hd] into the cache, attend q [1, n_h, T, hd]; return [T, n_h*hd]."""
    cache, start, t = step.cache, step.start, step.t
    span = step.spans[layer]
    if hasattr(cache, "attend"):  # a compacted (lossy) cache attends over its own layout
        return cache.attend(q, k, v, step, layer, scale, softcap)
    cache.write(layer, start, k, v)
    k, v = k.to(cache.k[layer].dtype), v.to(cache.v[layer].dtype)
    # a tree over a view has no caller and keeps the general masked path (_kernel_keys reads a
    # tree's keys from the cache's prefix)
    kernel = (
        t <= ROWWISE_MAX_T
        and not (step.tree is not None and span.index is not None)
        and _decode_kernel(cache, layer, q.shape[-1])
    )
    if span.index is not None and not (kernel and step.capture is None):
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
    if kernel:
        # Every row in one call, each bitwise what a one-token forward at its position gives
        # (attnkernel.cpp): decoding, verification, trees and views alike.
        lo, hi, ext = _kernel_keys(step, span)
        kc, vc = cache.k[layer], cache.v[layer]
        return attnkernel.rows(q[0].float(), kc, vc, lo, hi, ext, scale, softcap)
    if step.rowwise and 1 < t <= ROWWISE_MAX_T and span.index is None and step.tree is not None:
        return _attend_tree_rows(q, step, layer, span.window, scale, softcap)
    if step.rowwise and 1 < t <= ROWWISE_MAX_T and span.index is None:
        # Row i reads exactly the keys, in the same call shape, as a one-token forward at
        # position start+i would: bitwise the same output as plain decoding.
        rows = []
        for i in range(t):
            pos = start + i
            lo = first_key(pos, span.window)
            rows.append(
                _attend(
                    q[:, :, i : i + 1],
                    cache.k[layer][:, :, lo : pos + 1],
                    cache.v[layer][:, :, lo : pos + 1],
                    None,
                    scale,
                    softcap,
                )
            )
        return torch.cat(rows, 0)
    if span.index is None and span.causal:
        return _attend_causal(q, cache, layer, start, span.window, scale, softcap)
    if span.index is None:
        keys = cache.k[layer][:, :, span.lo : start + t]
        vals = cache.v[layer][:, :, span.lo : start + t]
    return _attend(q, keys, vals, span.mask, scale, softcap)


def _decode_kernel(cache: KVCache, layer: int, head_dim: int) -> bool:
    """Whether this layer's rows go through veridraft's decode attention kernel."""
    kc = cache.k[layer]
    return (
        head_dim <= 256
        and kc.dtype in (torch.float32, torch.bfloat16)
        and kc.is_contiguous()
        and attnkernel.load() is not None
    )


def _kernel_keys(step: Step, span: Span) -> tuple[Tensor, Tensor, Tensor | None]:
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
        out.append(_attend(q[:, :, i : i + 1], keys, vals, None, scale, softcap))
    return torch.cat(out, 0)


# Prefill rows are attended in tiles that start at multiples of this many positions: a chunked
# prefill whose chunks are multiples of it makes the same kernel calls as a one-block prefill
# (bitwise the same cache), and no [T, L] mask or score matrix is ever built.
PREFILL_TILE = 512
_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend_causal(
    q: Tensor, cache: KVCache, layer: int, start: int, window: int | None, scale: float, softcap
) -> Tensor:
    """Rows start..start+T, each over the cached keys up to itself (within its window).

    A tile [a, b) of a global layer is two flash calls merged by their log-sum-exp: the keys
    before a, all visible (no mask), and the square [a, b) with is_causal (SDPA's causal mask is
    aligned top-left, right for a square). Its cost follows the FLOPs of causal attention: one
    [T, L] masked call took 1.7x as long at T = 2k and 2x at 4k (docs/performance.md) and holds
    the mask. Sliding-window layers (and softcap) take one masked call per tile over the
    window's keys only, a [tile, tile + window] mask; so does a verification forward (T <= 64),
    for which one small call beats two and a merge."""
    t = q.shape[2]
    kc, vc = cache.k[layer], cache.v[layer]
    if (
        t > ROWWISE_MAX_T
        and attnkernel.for_prompts(kc.dtype)
        and _decode_kernel(cache, layer, q.shape[-1])
    ):
        return _attend_prompt_rows(q, kc, vc, start, window, scale, softcap)
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
            outs.append(_attend(qt, kc[:, :, lo:b], vc[:, :, lo:b], allowed, scale, softcap))
        a = b
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def _attend_prompt_rows(
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


def _attend(
    q: Tensor, keys: Tensor, vals: Tensor, mask: Tensor | None, scale: float, softcap
) -> Tensor:
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


class Attention(nn.Module):
    """q/k/v from one fused matmul; optional per-head q/k RMSNorm (Qwen3, Gemma 3); RoPE on q and
    k together; then `attend`."""

    def __init__(self, cfg: ModelConfig, layer: int, rope_index: int) -> None:
        super().__init__()
        self.layer, self.rope_index = layer, rope_index
        self.n_h, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = make_linear(cfg.dim, (self.n_h + 2 * self.n_kv) * self.hd, cfg.qkv_bias)
        self.wo = make_linear(self.n_h * self.hd, cfg.dim, cfg.o_bias)
        # q_norm's weight repeated per q head, then k_norm's per kv head: one norm call for both
        self.qk_weight = (
            nn.Parameter(torch.empty(self.n_h + self.n_kv, self.hd)) if cfg.qk_norm else None
        )
        self.eps = cfg.norm_eps
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else self.hd**-0.5
        self.softcap = cfg.attn_logit_softcapping

    kernel = None  # fused.cpp's steps (see RMSNorm)

    def forward(self, x: Tensor, step: Step) -> Tensor:
        t, nq = x.shape[0], self.n_h + self.n_kv
        qkv = self.wqkv(x).view(t, -1, self.hd)
        qk = qkv[:, :nq]
        if self.kernel is not None:
            if self.qk_weight is not None:
                w = self.qk_weight.reshape(-1)
                qk = self.kernel.rmsnorm(qk.reshape(t, -1), w, self.eps, self.hd).view(t, nq, -1)
            qk = self.kernel.rope(qk, *step.rope[self.rope_index])
        else:
            if self.qk_weight is not None:
                qk = F.rms_norm(qk, (self.hd,), eps=self.eps) * self.qk_weight
            qk = apply_rope(qk, *step.rope[self.rope_index])
        qk = qk.transpose(0, 1).unsqueeze(0)
        v = qkv[:, nq:].transpose(0, 1).unsqueeze(0)
        out = attend(
            qk[:, : self.n_h], qk[:, self.n_h :], v, step, self.layer, self.scale, self.softcap
        )
        if step.capture is not None and step.capture.press_rows:
            capture_press_attention(
                x, qk[:, : self.n_h], step, self.layer, self.scale, self.softcap
            )
        return self.wo(out)


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
    cap.press_input[layer] = _pooled_mean_std(parts)


def _pooled_mean_std(parts: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Mean and (unbiased) std of the union of groups given as (count, mean, std); one group
    gives its own values back."""
    if len(parts) == 1:
        return parts[0][1], parts[0][2]
    n = sum(c for c, _, _ in parts)
    mean = sum(c * m for c, m, _ in parts) / n
    ss = sum((c - 1) * sd * sd + c * (m - mean) ** 2 for c, m, sd in parts)
    return mean, math.sqrt(ss / max(1, n - 1))


class Transformer(nn.Module, ABC):
    """Embedding -> blocks -> final norm -> head. Subclasses set `layers` and `convert()`, and may override `embed()`."""

    def __init__(self, config: ModelConfig, precision: str = "fp32") -> None:
        super().__init__()
        self.config = config
        self.precision = precision
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = make_linear(config.dim, config.vocab_size)
        self.windows = config.layer_windows
        settings = [config.rope[FULL]]
        if config.rope[SLIDING] != config.rope[FULL]:
            settings.append(config.rope[SLIDING])
        self.rope_of_layer = [len(settings) - 1 if t == SLIDING else 0 for t in config.layer_types]
        self.rope = RopeTables(settings, config.head_dim)
        # SDPA's row results move by ~3e-7 with the number of query rows; bf16 rounds them into
        # different tokens between plain and speculative decoding, and in fp16w they are the
        # only thing between a verification forward and bitwise the logits of one-token steps.
        # The packed modes set this (apply_precision); fp32's MKL matmuls are not row-exact
        # anyway, so it keeps the batched kernel.
        self.rowwise_attention = False
        # The KV cache's element type: float32 here and in fp16w; the bf16 and q4 modes set
        # bfloat16 where veridraft's decode kernel runs (attnkernel.cache_dtype): half the bytes
        # a long-context step reads, and with AMX a prefill twice as fast (docs/performance.md).
        # Set it before new_cache to trade speed for memory.
        self.cache_dtype = torch.float32
        # q4 modes: the C++ forward of models/fused.py for the forwards it takes (None: Python)
        self.fused = None

    layers: nn.ModuleList

    def embed(self, tokens: Tensor) -> Tensor:
        # packed precisions keep a 16-bit table: rows are widened at lookup
        return F.embedding(tokens, self.tok_embeddings.weight).float()

    def new_cache(self, max_len: int) -> KVCache:
        c = self.config
        self.rope.ensure(max_len)
        return KVCache(c.n_layers, c.n_kv_heads, c.head_dim, max_len, self.cache_dtype)

    @torch.no_grad()
    def forward(
        self,
        tokens: Tensor,
        cache: KVCache,
        *,
        skip: Skip | None = None,
        view: Tensor | dict[int, Tensor] | None = None,
        capture: Capture | None = None,
        num_logits: int | None = None,
        tree: TreeAttn | None = None,
    ) -> Tensor:
        """Run tokens [T] at positions cache.length.. ; return float32 logits [n, vocab] of the
        last n = num_logits (default T) positions.

        tree (tree.tree_attn): the tokens are a token tree's root and nodes; row r still writes
        cache position cache.length + r but runs at position cache.length + depth(r) and sees
        only the prefix, the root and its ancestors (KVCache.keep then compacts a path)."""
        if not isinstance(tokens, Tensor):
            tokens = torch.tensor(tokens, dtype=torch.long)
        tokens = tokens.reshape(-1)
        t = tokens.shape[0]
        start = cache.reserve(t)
        skip_attn = skip.attn if skip is not None else frozenset()
        skip_mlp = skip.mlp if skip is not None else frozenset()
        if tree is not None and (view is not None or tree.mask.shape[0] != t):
            raise VeridraftError(
                "a tree forward takes one row per tree node plus the root, and no view"
            )

        spans: list[Span | None] = []
        shared: dict = {}  # layers with the same window (and view) share one span
        for i, w in enumerate(self.windows):
            v = view.get(i) if isinstance(view, dict) else view
            if i in skip_attn:
                spans.append(None)
            elif tree is not None:
                if w not in shared:
                    shared[w] = make_tree_span(start, tree, w)
                spans.append(shared[w])
            elif v is not None:
                # layers given the same view tensor share its span (one check, one mask)
                if (w, id(v)) not in shared:
                    shared[(w, id(v))] = make_span(start, t, w, v)
                spans.append(shared[(w, id(v))])
            else:
                if w not in shared:
                    shared[w] = make_span(start, t, w, None)
                spans.append(shared[w])
        if tree is None:
            rope = [self.rope.get(j, start, t) for j in range(len(self.rope.inv_freq))]
        else:
            qpos = start + tree.depth
            rope = [self.rope.at(j, qpos) for j in range(len(self.rope.inv_freq))]
        wants_attn = capture is not None and (capture.attn_rows > 0 or capture.press_rows > 0)
        attn_cap = capture if wants_attn else None
        step = Step(cache, start, t, rope, spans, self.rowwise_attention, tree, attn_cap)

        want = set(capture.hidden_layers) if capture is not None else set()
        n_layers = self.config.n_layers
        n = t if num_logits is None else min(num_logits, t)
        x = self.embed(tokens)
        if self.fused is not None and self.fused.takes(step, cache, capture, want):
            mlp = [i not in skip_mlp for i in range(n_layers)]
            logits, hidden = self.fused.run(x, step, mlp, n, bool(want))
            cache.advance(t)
            for key in want:
                capture.hidden[key] = hidden
            return self._softcap(logits) if n else logits
        for i, layer in enumerate(self.layers):
            x = layer(x, step, i not in skip_attn, i not in skip_mlp)
            if i in want:
                capture.hidden[i] = x
        cache.advance(t)

        if -1 in want or n_layers in want:
            x = self.norm(x)
            for key in (-1, n_layers):
                if key in want:
                    capture.hidden[key] = x
            x = x[t - n :]
        else:
            x = self.norm(x[t - n :])
        if n == 0:  # hidden states only (a drafter's own head): the full head costs a step
            return x.new_empty(0, self.config.vocab_size)
        return self._softcap(self.output(x)).float()

    def _softcap(self, logits: Tensor) -> Tensor:
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # -- loading --

    @abstractmethod
    def convert(self, take: Any) -> dict[str, Tensor]:
        """Map HF tensors (fetched by name through `take`) to this module's state dict."""

    def load_hf(self, sd: dict[str, Tensor], source: str) -> None:
        def take(name: str) -> Tensor:
            t = sd[checkpoint_key(sd, name, source)]
            return t.float() if t.dtype != torch.float32 else t

        native = self.convert(take)
        if self.config.tie_embeddings:
            native["output.weight"] = native["tok_embeddings.weight"]
        else:
            native["output.weight"] = take("lm_head.weight")
        self.load_state_dict(native, strict=True, assign=True)
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.requires_grad_(False)
        self.eval()


def fuse(*ts: Tensor) -> Tensor:
    return torch.cat(ts, dim=0)


def attention_tensors(
    take: Any, cfg: ModelConfig, i: int, p: str, norm_offset: float = 0.0
) -> dict[str, Tensor]:
    """q/k/v fused into one weight (one matmul, one read of x), plus o and the q/k norms."""
    a = f"model.layers.{i}.self_attn."
    out = {
        f"{p}wqkv.weight": fuse(*(take(f"{a}{n}_proj.weight") for n in "qkv")),
        f"{p}wo.weight": take(f"{a}o_proj.weight"),
    }
    if cfg.qkv_bias:
        out[f"{p}wqkv.bias"] = fuse(*(take(f"{a}{n}_proj.bias") for n in "qkv"))
    if cfg.o_bias:
        out[f"{p}wo.bias"] = take(f"{a}o_proj.bias")
    if cfg.qk_norm:
        q = take(f"{a}q_norm.weight") + norm_offset
        k = take(f"{a}k_norm.weight") + norm_offset
        out[f"{p}qk_weight"] = fuse(q.expand(cfg.n_heads, -1), k.expand(cfg.n_kv_heads, -1))
    return out


def checkpoint_key(sd, name: str, source: str = "the checkpoint") -> str:
    """The key of HF tensor `name` in a checkpoint: as named, or under the multimodal
    checkpoints' "model.language_model." prefix."""
    for key in (name, name.replace("model.", "model.language_model.", 1)):
        if key in sd:
            return key
    raise VeridraftError(f"{source} lacks tensor {name!r}; re-pull or re-convert the model")


def hf_linear_parts(cfg: ModelConfig, name: str) -> list[str]:
    """The checkpoint (HF) weights a native linear is fused from, in fusion order, e.g.
    "layers.3.attention.wqkv" -> the q, k and v projections of layer 3."""
    if name == "output":
        return ["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
    _, i, _, lin = name.split(".")
    table = {
        "wqkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "wo": ["self_attn.o_proj"],
        "w13": ["mlp.gate_proj", "mlp.up_proj"],
        "w2": ["mlp.down_proj"],
    }
    return [f"model.layers.{i}.{part}.weight" for part in table[lin]]


def mlp_tensors(take: Any, cfg: ModelConfig, i: int, p: str) -> dict[str, Tensor]:
    m = f"model.layers.{i}.mlp."
    out = {
        f"{p}w13.weight": fuse(take(f"{m}gate_proj.weight"), take(f"{m}up_proj.weight")),
        f"{p}w2.weight": take(f"{m}down_proj.weight"),
    }
    if cfg.mlp_bias:
        out[f"{p}w13.bias"] = fuse(take(f"{m}gate_proj.bias"), take(f"{m}up_proj.bias"))
        out[f"{p}w2.bias"] = take(f"{m}down_proj.bias")
    return out


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VeridraftError(f"cannot read {path}: {e}; re-pull or re-convert the model") from e
