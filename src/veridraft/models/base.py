"""What every native architecture shares: the layers and the forward driver.

An architecture file (llama.py, gemma3.py) only defines its Block and how HF tensor names map
onto it; `Transformer.forward` here runs the contract (positions from the cache, skip, view,
capture, last-n logits) the same way for all of them, along the paths the forward plan chose
(plan.py). The config lives in config.py, RoPE in rope.py, the attention paths in attention.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import KVCache
from ..tree import TreeAttn

# Re-exported: the names other modules have always imported from models.base.
from .attention import (  # noqa: F401
    PREFILL_TILE,
    ROWWISE_MAX_T,
    Capture,
    Span,
    Step,
    attend,
    capture_press_attention,
    first_key,
    make_span,
    make_tree_span,
)
from .config import (  # noqa: F401
    FULL,
    SLIDING,
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    checkpoint_key,
    hf_linear_parts,
    read_json,
)
from .plan import ForwardPlan, Skip, plan_forward  # noqa: F401
from .precision import PRECISIONS  # noqa: F401
from .rope import RopeTables, apply_rope  # noqa: F401

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
        # a long-context step reads, and with AMX a prefill twice as fast (docs/performance/intel-xeon-amx.md).
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
        cfg = self.config
        plan = plan_forward(
            cache,
            start,
            t,
            self.windows,
            cfg.head_dim,
            skip=skip,
            view=view,
            tree=tree,
            capture=capture,
            rowwise=self.rowwise_attention,
            fused=self.fused is not None,
        )
        if tree is None:
            rope = [self.rope.get(j, start, t) for j in range(len(self.rope.inv_freq))]
        else:
            qpos = start + tree.depth
            rope = [self.rope.at(j, qpos) for j in range(len(self.rope.inv_freq))]
        wants_attn = capture is not None and (capture.attn_rows > 0 or capture.press_rows > 0)
        attn_cap = capture if wants_attn else None
        step = Step(
            cache,
            start,
            t,
            rope,
            plan.spans,
            self.rowwise_attention,
            tree,
            attn_cap,
            paths=plan.paths,
        )

        want = set(capture.hidden_layers) if capture is not None else set()
        n_layers = cfg.n_layers
        n = t if num_logits is None else min(num_logits, t)
        x = self.embed(tokens)
        if plan.fused:
            mlp = [i not in skip_mlp for i in range(n_layers)]
            final = want & {-1, n_layers}
            keep = tuple(sorted(want - final))
            logits, hidden, kept = self.fused.run(x, step, plan, mlp, n, bool(final), keep)
            cache.advance(t)
            for key in final:
                capture.hidden[key] = hidden
            if kept:
                capture.hidden.update(kept)
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
