"""EAGLE-3 draft head: a trained one-layer drafter that reads the target's hidden states.

The head sees, for each position t the target has run, the target's hidden states after a low,
a middle and a high layer (concatenated, 3 x dim, `fc` -> dim) and the embedding of the token
at t + 1 (the target's own table), and predicts the token at t + 2 over a reduced draft
vocabulary (`d2t` maps draft ids back to target ids). Its body is one decoder layer: attention
over the head's own KV cache of the earlier positions, an MLP, RMSNorms. Drafting past the
last verified position feeds the layer's own output hidden state back in place of the target's
features (as the head was trained: `veridraft train head`, training-time test).

The features cost no extra forward: the drafter asks the verification forward (chain or tree)
and the prompt's forwards for those three layers (`verify_capture`, `prompt_capture` in
veridraft.draft) and keeps the rows of the accepted path.

Spec: ``eagle[:head=PATH][:k=N,topk=K,nodes=N,mode=chain|tree,weights=fp32|bf16,window=W,
sink=S]``.
`head`: a head folder, or a name under ``<model folder>/heads/`` (default: the newest
``heads/eagle-*`` there). `mode=tree` (default) grows a token tree best-first by path
probability, `k` levels deep, the `topk` best nodes of a level expanded by their `topk` best
children (EAGLE-2's dynamic tree); the number of nodes verified is `CostModel.best_nodes` of
their path probabilities when the machine has a cost profile, else `nodes`. `mode=chain` drafts
`k` tokens. `weights=bf16` runs the head's matmuls in bfloat16: a draft step reads half the
bytes, but the rounding changes a few drafts (near ties), so the default is float32, which
drafts the tokens EagleHead's own layer predicts (HeadRunner). `window=W` (LongSpec's
constant-size draft): every row attends to the head's first `sink` rows (default 4) and its last
W rows only, so the head's cache and step cost stop growing with the context; the default is
the window the head was trained for (config.json's LONG_KEY), else full attention. A row's RoPE
position is its head position (the target position of head row 0 plus its row, as without a
window), not its cache row: the cache drops old rows by moving the last ones down.

Lossless: greedy drafts are argmaxes (point masses); under sampling a chain samples each token
from the head's distribution and reports it as q, and a tree proposes its distinct top-k
children as point masses (verify.verify_tree).

Checkpoint: EAGLE-3's Hugging Face folder as vLLM and SGLang load it (`LlamaForCausalLMEagle3`:
config.json with `draft_vocab_size` and `eagle_config.eagle_aux_hidden_state_layer_ids`;
model.safetensors with fc, midlayer.*, norm, lm_head, d2t, t2d).

Variants (Dovetail's, for a CPU verifier): `num_layers` > 1 stacks plain decoder layers
(`layers.{i}.*`, input and residual the previous layer's output) after the first, and
`fusion="gated"` replaces the first layer's [RMSNorm(e); RMSNorm(f)] input with Dynamic Gating
Fusion (`gate.*`): h1 = f W1, h2 = SiLU(RMSNorm(e) W2), z = sigmoid([h1; h2] Wz),
x = z * h1 + (1 - z) * h2, and the first layer is then a plain decoder layer over x. f is the
fused target features (`fc`) on real rows and the head's previous output on drafted rows, as in
EAGLE-3. Such a head is saved under its own architecture name (VARIANT_ARCH), which vLLM's and
SGLang's eagle3 loaders do not load.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..draft import DecodeContext, Draft, DraftEnv, Round
from ..errors import VeridraftError
from ..models.base import Capture
from ..sampling import probs, sample
from ..spec import Param
from .params import as_choice, as_int

ARCH = "LlamaForCausalLMEagle3"
VARIANT_ARCH = "VeridraftEagle3Variant"  # deeper or gated heads: only veridraft runs them
FUSIONS = ("fc", "gated")
HEADS_DIR = "heads"
PREFIX = "eagle-"
LONG_KEY = "veridraft_long_context"  # config.json: the window a head was trained for
DEFAULT_SINK = 4  # LongSpec's attention sink: the first rows every row keeps seeing
CATCH_UP_ROWS = 256  # real rows per head call when catching up (a long prompt's memory bound)


def train_hint(model_name: str) -> str:
    return f"veridraft train head --model {model_name} --corpus spec-bench-dev (or stdlib)"


def default_aux_ids(n_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's layers, as the index of the decoder layer whose *input* is taken (2, L//2,
    L-3; vLLM's and SGLang's convention), clamped to the model's layers."""
    return tuple(max(1, min(n_layers, i)) for i in (2, n_layers // 2, n_layers - 3))


@dataclass
class HeadConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    aux_ids: tuple[int, ...]  # input of these decoder layers = output of block id - 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    meta: dict = field(default_factory=dict)  # how it was trained (veridraft's own key)
    fusion: str = "fc"  # "fc": EAGLE-3's [e; f] input; "gated": Dovetail's gating fusion
    num_layers: int = 1  # decoder layers (Dovetail: deeper drafts for a CPU verifier)
    # LongSpec's constant-size draft: attention over the first `sink` rows and the last
    # `window` rows only (None: all earlier rows); `anchor_offset`: the largest random shift of
    # the positions after the sink in training (how the head learnt large position numbers)
    window: int | None = None
    sink: int = DEFAULT_SINK
    anchor_offset: int = 0

    @property
    def variant(self) -> bool:
        """A head EAGLE-3's loaders (vLLM, SGLang) cannot run."""
        return self.fusion != "fc" or self.num_layers != 1

    @property
    def capture_layers(self) -> tuple[int, ...]:
        """The same layers in models.base.Capture's numbering (output of block i)."""
        return tuple(i - 1 for i in self.aux_ids)

    def to_hf(self) -> dict:
        out = {
            "architectures": [VARIANT_ARCH if self.variant else ARCH],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": self.num_layers,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "eagle_config": {
                "eagle_aux_hidden_state_layer_ids": list(self.aux_ids),
                "use_aux_hidden_state": True,
                "use_input_layernorm_in_first_layer": True,
            },
            "veridraft": self.meta,
        }
        if self.window is not None or self.anchor_offset:
            # veridraft's own key: an EAGLE-3 loader ignores it (and attends to every row)
            out[LONG_KEY] = {
                "window": self.window,
                "sink": self.sink,
                "anchor_offset": self.anchor_offset,
            }
        if self.variant:
            out["veridraft_variant"] = {
                "fusion": self.fusion,
                "num_layers": self.num_layers,
                "loadable_by": "veridraft only: vLLM's and SGLang's eagle3 loaders cannot load "
                "it (they build one EAGLE-3 layer with fc fusion)",
            }
        return out

    @classmethod
    def from_hf(cls, cfg: dict, where: str) -> HeadConfig:
        archs = cfg.get("architectures", [])
        if ARCH not in archs and VARIANT_ARCH not in archs:
            raise VeridraftError(
                f"{where} is not an EAGLE-3 head (architectures {cfg.get('architectures')}, "
                f"expected {ARCH}); pass head= an EAGLE-3 folder"
            )
        try:
            h = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            aux = cfg.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids")
            var = cfg.get("veridraft_variant") or {}
            fusion = str(var.get("fusion", "fc"))
            if fusion not in FUSIONS:
                raise VeridraftError(
                    f"{where}: fusion {fusion!r} is not one this version runs ({', '.join(FUSIONS)})"
                )
            return cls(
                hidden_size=h,
                intermediate_size=int(cfg["intermediate_size"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
                head_dim=int(cfg.get("head_dim") or h // heads),
                vocab_size=int(cfg["vocab_size"]),
                draft_vocab_size=int(cfg.get("draft_vocab_size") or cfg["vocab_size"]),
                target_hidden_size=int(cfg.get("target_hidden_size") or h),
                aux_ids=tuple(int(i) for i in aux),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                meta=dict(cfg.get("veridraft") or {}),
                fusion=fusion,
                num_layers=int(var.get("num_layers", cfg.get("num_hidden_layers", 1))),
                **_long_context(cfg.get(LONG_KEY), where),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise VeridraftError(
                f"{where}: config.json lacks or mangles {e}; re-save the head"
            ) from None


def _long_context(d: dict | None, where: str) -> dict:
    """HeadConfig's window/sink/anchor_offset from config.json's LONG_KEY (absent: a head
    trained with full attention)."""
    if not d:
        return {}
    window = None if d.get("window") is None else int(d["window"])
    sink, offset = int(d.get("sink", DEFAULT_SINK)), int(d.get("anchor_offset", 0))
    if (window is not None and window < 1) or sink < 0 or offset < 0:
        raise VeridraftError(
            f"{where}: {LONG_KEY} has window {window}, sink {sink}, anchor_offset {offset}; "
            "window must be >= 1, sink and anchor_offset >= 0: re-save the head"
        )
    return {"window": window, "sink": sink, "anchor_offset": offset}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _Attn(nn.Module):
    def __init__(self, c: HeadConfig, fused: bool = True) -> None:
        super().__init__()
        # EAGLE-3's first layer reads the normed embedding and the normed feature side by side
        d2 = 2 * c.hidden_size if fused else c.hidden_size
        self.q_proj = nn.Linear(d2, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(d2, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(d2, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)


class _MLP(nn.Module):
    def __init__(self, c: HeadConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _MidLayer(nn.Module):
    """fused: EAGLE-3's layer over [RMSNorm(e); RMSNorm(f)]; else a plain decoder layer."""

    def __init__(self, c: HeadConfig, fused: bool = True) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)  # the embedding's
        if fused:
            self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)  # the fused feature's
        self.self_attn = _Attn(c, fused)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = _MLP(c)


class _Gate(nn.Module):
    """Dynamic Gating Fusion of the feature f and the token embedding e (Dovetail)."""

    def __init__(self, c: HeadConfig) -> None:
        super().__init__()
        d = c.hidden_size
        self.w1 = nn.Linear(d, d, bias=False)
        self.emb_norm = RMSNorm(d, c.rms_norm_eps)
        self.w2 = nn.Linear(d, d, bias=False)
        self.wz = nn.Linear(2 * d, d, bias=False)

    def forward(self, f: Tensor, e: Tensor) -> Tensor:
        h1 = self.w1(f)
        h2 = F.silu(self.w2(self.emb_norm(e)))
        z = torch.sigmoid(self.wz(torch.cat((h1, h2), -1)))
        return z * h1 + (1 - z) * h2


class EagleHead(nn.Module):
    """The head's weights under EAGLE-3's names, and the pieces of its layer. Rows are [..., T,
    features]; attention itself is the caller's (a KV cache at inference, the training-time
    test's unrolled mask in training)."""

    def __init__(self, c: HeadConfig) -> None:
        super().__init__()
        self.config = c
        if c.fusion not in FUSIONS or c.num_layers < 1:
            raise VeridraftError(
                f"head: fusion {c.fusion!r} and {c.num_layers} layers; fusion is one of "
                f"{', '.join(FUSIONS)} and layers >= 1"
            )
        if (c.window is not None and c.window < 1) or c.sink < 0 or c.anchor_offset < 0:
            raise VeridraftError(
                f"head: window {c.window}, sink {c.sink}, anchor offset {c.anchor_offset}; the "
                "window is >= 1 (or None: full attention), sink and anchor offset >= 0"
            )
        self.fc = nn.Linear(len(c.aux_ids) * c.target_hidden_size, c.hidden_size, bias=False)
        gated = c.fusion == "gated"
        if gated:
            self.gate = _Gate(c)
        self.midlayer = _MidLayer(c, fused=not gated)
        # the deeper layers: plain decoder layers (their names start at 1, after midlayer)
        self.layers = nn.ModuleList(_MidLayer(c, fused=False) for _ in range(c.num_layers - 1))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(c.vocab_size, dtype=torch.bool))
        hd = c.head_dim
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    @property
    def draft_ids(self) -> Tensor:
        """Target id of each draft id."""
        return torch.arange(self.config.draft_vocab_size) + self.d2t

    def rope(self, x: Tensor, pos: Tensor) -> Tensor:
        """Llama's rotary embedding (rotate-half layout) of x [..., T, heads, hd] at pos [T]
        (or [B, T]: a position per sample and row, as anchor-offset training shifts them)."""
        f = pos.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((f, f), -1)
        cos, sin = emb.cos()[..., None, :], emb.sin()[..., None, :]
        a, b = x.chunk(2, -1)
        return x * cos + torch.cat((-b, a), -1) * sin

    def layer(self, i: int) -> _MidLayer:
        return self.midlayer if i == 0 else self.layers[i - 1]

    def start(self, hidden: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        """(the first layer's normed input, its residual) for rows with input hidden state
        `hidden` (fused features, or the head's previous output) and token embedding `emb`."""
        m = self.midlayer
        if self.config.fusion == "gated":
            x = self.gate(hidden, emb)
            return m.input_layernorm(x), x
        return torch.cat((m.input_layernorm(emb), m.hidden_norm(hidden)), -1), hidden

    def layer_qkv(self, i: int, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [.., T, heads, hd], k, v [.., T, kv_heads, hd] of layer i from its normed input."""
        c, a = self.config, self.layer(i).self_attn
        sh = x.shape[:-1]
        q = a.q_proj(x).view(*sh, c.num_attention_heads, c.head_dim)
        k = a.k_proj(x).view(*sh, c.num_key_value_heads, c.head_dim)
        v = a.v_proj(x).view(*sh, c.num_key_value_heads, c.head_dim)
        return self.rope(q, pos), self.rope(k, pos), v

    def layer_finish(self, i: int, resid: Tensor, attn: Tensor) -> Tensor:
        """Layer i's output from its residual and its attention [.., T, heads, hd]."""
        m = self.layer(i)
        h = resid + m.self_attn.o_proj(attn.flatten(-2))
        return h + m.mlp(m.post_attention_layernorm(h))

    def norm_in(self, i: int, h: Tensor) -> Tensor:
        """A deeper layer's normed input from the previous layer's output."""
        return self.layer(i).input_layernorm(h)

    def qkv(self, hidden: Tensor, emb: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The first layer's q, k, v (`start` then `layer_qkv`)."""
        return self.layer_qkv(0, self.start(hidden, emb)[0], pos)

    def finish(self, hidden: Tensor, attn: Tensor) -> Tensor:
        """A one-layer fc head's output from its input and the attention [.., T, heads, hd]."""
        return self.layer_finish(0, hidden, attn)

    def logits(self, h: Tensor) -> Tensor:
        """Draft-vocabulary logits of output hidden states."""
        return self.lm_head(self.norm(h))


# -- the draft-time forward --

WEIGHTS_CHOICES = ("fp32", "bf16")
PACK_ROWS = 16  # oneDNN's batch-size hint for the reorder: a draft call runs 1..topk rows


class _Dense:
    """x [R, in] float32 -> x @ W.T [R, out] float32, W (float32, or bfloat16: half the bytes a
    step reads) reordered once into oneDNN's blocked layout. A draft call runs 1 to topk rows;
    oneDNN reads the weights once for all of them (a plain float32 matmul of 2-3 rows measured
    2-3x its one-row time here, oneDNN's about one-row time). Without oneDNN: F.linear. Not
    models.precision.PackedLinear: drafts need no batch invariance, so no row-floor probe and
    no padded rows."""

    def __init__(self, w: Tensor, bf16: bool) -> None:
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.w: Tensor | None = w.detach().to(self.dtype).contiguous()
        self.packed = None
        if torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.w, PACK_ROWS)
                self.w = None
            except (RuntimeError, AttributeError):  # a torch without the op: F.linear
                self.packed = None

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        else:
            y = F.linear(x, self.w)
        return y.float()


class HeadRunner:
    """The head's layer at draft time: the same function as EagleHead's pieces, shaped for the
    one to a few rows a draft step runs. On a CPU such a step costs its weight bytes plus
    torch's per-call overhead, so it makes few calls over few bytes:

    - q/k/v is one matmul and gate/up another (their weights stacked once), every weight
      prepacked once for oneDNN, which reads it once for all of a call's rows (`bf16`: in
      bfloat16, half the bytes, and rounded);
    - the KV cache is preallocated head-major, [kv_heads, rows, hd], and written in place;
      grouped-query attention multiplies each KV head's keys by its group of query heads as one
      matrix (no repeated KV);
    - RoPE reads cos/sin tables (the sign of rotate-half folded into sin).

    A deeper head (num_layers > 1) has a cache per layer; a gated head fuses with its gate's
    three matmuls first (w1 and the SiLU branch's w2 are separate inputs, so two calls and wz).
    """

    def __init__(self, head: EagleHead, bf16: bool) -> None:
        c = head.config
        self.config, self.bf16 = c, bf16
        self.group = c.num_attention_heads // c.num_key_value_heads
        self.scale = math.sqrt(c.head_dim)
        self.fc = _Dense(head.fc.weight, bf16)
        self.head = head
        self.gated = c.fusion == "gated"
        if self.gated:
            g = head.gate
            self.w1, self.w2, self.wz = (_Dense(w.weight, bf16) for w in (g.w1, g.w2, g.wz))
            self.emb_norm = g.emb_norm
        self.qkv, self.o, self.gate_up, self.down = [], [], [], []
        for i in range(c.num_layers):
            a, mlp = head.layer(i).self_attn, head.layer(i).mlp
            self.qkv.append(
                _Dense(torch.cat((a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)), bf16)
            )
            self.o.append(_Dense(a.o_proj.weight, bf16))
            self.gate_up.append(_Dense(torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)), bf16))
            self.down.append(_Dense(mlp.down_proj.weight, bf16))
        self.lm_head = _Dense(head.lm_head.weight, bf16)
        # the head's own norms: the same rounding as EagleHead (F.rms_norm's fused op differs
        # in the last bit, which can flip a near tie)
        m = head.midlayer
        self.norms = {"post": m.post_attention_layernorm, "final": head.norm}
        self.norms["emb"] = m.input_layernorm
        if not self.gated:
            self.norms["hidden"] = m.hidden_norm
        self.inv_freq = head.inv_freq
        self.k = self.v = self.cos = self.sin = None
        self.ks: list[Tensor] = []
        self.vs: list[Tensor] = []

    @property
    def rows(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def reserve(self, rows: int, positions: int | None = None) -> None:
        """Room for `rows` cache rows and RoPE positions 0 .. positions - 1 (default: rows).
        A windowed drafter keeps fewer rows than positions: a row's position is its target
        position, not its row (keys are cached after RoPE, so a moved row keeps it)."""
        positions = rows if positions is None else positions
        c = self.config
        if self.rows < rows:
            shape = (c.num_key_value_heads, rows, c.head_dim)
            self.ks = [torch.empty(shape) for _ in range(c.num_layers)]
            self.vs = [torch.empty(shape) for _ in range(c.num_layers)]
            self.k, self.v = self.ks[0], self.vs[0]
        if self.cos is not None and self.cos.shape[0] >= positions:
            return
        f = torch.arange(positions, dtype=torch.float32)[:, None] * self.inv_freq
        emb = torch.cat((f, f), -1)  # EagleHead.rope's angles, bit for bit
        half = c.head_dim // 2
        sin = emb.sin()
        self.cos = emb.cos()
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), -1)

    def _norm(self, x: Tensor, which: str) -> Tensor:
        return self.norms[which](x)

    def move(self, src: int, dst: int, n: int) -> None:
        """Cache rows src .. src + n - 1 to dst .. (dst < src; a window's compaction)."""
        for kc, vc in zip(self.ks, self.vs):
            kc[:, dst : dst + n] = kc[:, src : src + n].clone()
            vc[:, dst : dst + n] = vc[:, src : src + n].clone()

    def layer(
        self,
        hidden: Tensor,
        emb: Tensor,
        at: int,
        pos: slice,
        free: int,
        mask: Tensor | None,
        hide: tuple[int, int] | None = None,
    ) -> Tensor:
        """Output hidden states [R, D] of R rows with inputs `hidden` and token embeddings `emb`
        [R, D] at head positions `pos` (R of them, or one shared by all rows). Their keys and
        values go to cache rows at .. at + R - 1; they attend to rows 0 .. free - 1 and, of the
        rows free .. at + R - 1, where mask [R, at + R - free] is True (None: all of them);
        `hide` (a, b): rows a .. b - 1 are seen by none (those left of a sliding window)."""
        if self.gated:
            h1 = self.w1(hidden)
            h2 = F.silu(self.w2(self.emb_norm(emb)))
            z = torch.sigmoid(self.wz(torch.cat((h1, h2), -1)))
            resid = z * h1 + (1 - z) * h2
            x = self._norm(resid, "emb")
        else:
            resid = hidden
            x = torch.cat((self._norm(emb, "emb"), self._norm(hidden, "hidden")), -1)
        h = self._layer(0, x, resid, at, pos, free, mask, hide)
        for i in range(1, self.config.num_layers):
            norm = self.head.layer(i).input_layernorm(h)
            h = self._layer(i, norm, h, at, pos, free, mask, hide)
        return h

    def _layer(
        self,
        i: int,
        x: Tensor,
        resid: Tensor,
        at: int,
        pos,
        free: int,
        mask: Tensor | None,
        hide: tuple[int, int] | None,
    ) -> Tensor:
        c = self.config
        r, heads, kv = x.shape[0], c.num_attention_heads, c.num_key_value_heads
        hd, g = c.head_dim, self.group
        kc, vc = self.ks[i], self.vs[i]
        y = self.qkv[i](x)
        qk = y[:, : (heads + kv) * hd].view(r, heads + kv, hd)
        qk = qk * self.cos[pos, None] + qk.roll(hd // 2, -1) * self.sin[pos, None]
        end = at + r
        kc[:, at:end] = qk[:, heads:].transpose(0, 1)
        vc[:, at:end] = y[:, (heads + kv) * hd :].view(r, kv, hd).transpose(0, 1)
        # query head h reads KV head h // g (repeat_interleave's grouping)
        q = qk[:, :heads].reshape(r, kv, g, hd).permute(1, 2, 0, 3).reshape(kv, g * r, hd)
        s = torch.matmul(q, kc[:, :end].transpose(1, 2)).div_(self.scale)  # [kv, g * r, end]
        if mask is not None:
            s.view(kv, g, r, end)[..., free:].masked_fill_(~mask, float("-inf"))
        if hide is not None:
            s[..., hide[0] : hide[1]] = float("-inf")
        o = torch.matmul(torch.softmax(s, -1), vc[:, :end])  # [kv, g * r, hd]
        o = o.view(kv, g, r, hd).permute(2, 0, 1, 3).reshape(r, heads * hd)
        h = resid + self.o[i](o)
        gu = self.gate_up[i](self.head.layer(i).post_attention_layernorm(h))
        gate, up = gu.chunk(2, -1)
        return h + self.down[i](F.silu(gate) * up)

    def logits(self, h: Tensor) -> Tensor:
        return self.lm_head(self._norm(h, "final"))


# -- checkpoint --

WEIGHTS = "model.safetensors"


def save_head(head: EagleHead, folder: str | Path) -> Path:
    """Write the head as EAGLE-3's HF folder (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / WEIGHTS)
    (folder / "config.json").write_text(json.dumps(head.config.to_hf(), indent=2) + "\n")
    return folder


def load_head(folder: str | Path) -> EagleHead:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / WEIGHTS).is_file():
        raise VeridraftError(
            f"no EAGLE-3 head at {folder} (config.json and {WEIGHTS} expected); train one with "
            "veridraft train head"
        )
    cfg = HeadConfig.from_hf(json.loads((folder / "config.json").read_text()), str(folder))
    head = EagleHead(cfg)
    sd = load_file(str(folder / WEIGHTS))
    sd.pop("embed_tokens.weight", None)  # some trainers save the target's table: ours is read
    missing, unexpected = head.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise VeridraftError(
            f"{folder}/{WEIGHTS}: missing {sorted(missing)[:4]}, unexpected "
            f"{sorted(unexpected)[:4]}; not an EAGLE-3 head this version reads"
        )
    head.d2t = head.d2t.long()
    head.t2d = head.t2d.bool()
    head.requires_grad_(False)
    return head.eval()


def check_vllm_loadable(folder: str | Path) -> None:
    """Refuse, in one line, a head vLLM's and SGLang's eagle3 loaders cannot load (a gated or
    deeper variant); an EAGLE-3 head or an unreadable folder passes (the caller reports the
    latter)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return
    var = cfg.get("veridraft_variant")
    if VARIANT_ARCH in cfg.get("architectures", []) or var:
        var = var or {}
        raise VeridraftError(
            f"eagle: the head at {folder} is veridraft's variant (fusion "
            f"{var.get('fusion', '?')}, {var.get('num_layers', '?')} layers), which vLLM's and "
            "SGLang's eagle3 loaders cannot load; train an EAGLE-3 head (--fusion fc --layers 1)"
        )


def find_head(model_dir: Path | None, spec: str | None) -> Path | None:
    """The head folder: `spec` as a path, or as a name under model_dir/heads/ (with or without
    the eagle- prefix); None: the newest heads/eagle-* folder, or None when there is none."""
    base = model_dir / HEADS_DIR if model_dir is not None else None
    if spec:
        for p in (Path(spec).expanduser(),):
            if p.is_dir():
                return p
        if base is not None:
            for name in (spec, PREFIX + spec):
                if (base / name).is_dir():
                    return base / name
        return Path(spec)
    if base is None or not base.is_dir():
        return None
    found = [p for p in base.glob(PREFIX + "*") if (p / "config.json").is_file()]
    return max(found, key=lambda p: (p / "config.json").stat().st_mtime) if found else None


def head_spec(arg: str | None, param: str | None) -> str | None:
    """The head named by the spec's argument (`eagle:head=PATH` or `eagle:PATH`, as in
    `eagle:head=PATH:k=4`) or by its `head=` parameter."""
    if arg is not None:
        arg = arg[5:] if arg.lower().startswith("head=") else arg
        if param is not None and param != arg:
            raise VeridraftError(f"eagle: two heads given ({arg!r} and {param!r}); give one")
        return arg
    return param


def check_head(head: EagleHead, net, where: str, model_name: str) -> None:
    """A head trained for another model fails here, in one line, not as a shape error later."""
    c, t = head.config, net.config
    problems = []
    if c.target_hidden_size != t.dim:
        problems.append(f"hidden size {c.target_hidden_size} (the model's: {t.dim})")
    if c.vocab_size != t.vocab_size:
        problems.append(f"vocabulary {c.vocab_size} (the model's: {t.vocab_size})")
    if c.hidden_size != t.dim:
        problems.append(f"head width {c.hidden_size} (the model's embeddings: {t.dim})")
    if any(not 1 <= i <= t.n_layers for i in c.aux_ids):
        problems.append(f"layers {list(c.aux_ids)} (the model has {t.n_layers})")
    if problems:
        raise VeridraftError(
            f"eagle: the head at {where} does not fit {model_name}: {'; '.join(problems)}; "
            f"train one with `{train_hint(model_name)}`"
        )


# -- the drafter --


@dataclass
class Node:
    token: int
    parent: int  # index in the node list, -1: a child of the last committed token
    logp: float  # path log-probability under the head
    depth: int


class EagleDrafter:
    """Draft with an EAGLE-3 head over the target's captured hidden states."""

    name = "eagle"
    takes_arg = None  # optional: eagle:head=PATH (or eagle:PATH) before the parameters
    usage = (
        "eagle[:head=PATH][:k=N,topk=K,nodes=N,mode=chain|tree,weights=fp32|bf16,"
        "window=W|full,sink=S]"
    )
    description = (
        "EAGLE-3 draft head: one decoder layer over the target's own hidden states "
        "(`veridraft train head` makes one)"
    )
    params = {
        "head": Param(str, None, "the head's folder (default: the newest in the model's heads/)"),
        "k": Param(int, 5, "draft depth: a chain's length, a tree's deepest level"),
        "topk": Param(int, 3, "children expanded per tree node"),
        "nodes": Param(int, None, "tree nodes verified (default: the cost model's best, else 12)"),
        "mode": Param(str, "tree", "a token tree or a chain", ("chain", "tree")),
        "weights": Param(
            str,
            "fp32",
            "the head's matmul weights: bf16 steps faster but changes a few drafts",
            WEIGHTS_CHOICES,
        ),
        "window": Param(
            str,
            None,
            "attend to the first `sink` and the last W real rows only (constant memory and step "
            "cost); full: every row (default: the window the head was trained for, else full)",
        ),
        "sink": Param(
            int, None, "rows at the start every row keeps seeing (default: the head's, 4)"
        ),
    }
    aliases = {"num_tokens": "k", "depth": "k", "path": "head"}

    def __init__(
        self,
        head: EagleHead,
        *,
        k: int = 5,
        topk: int = 3,
        nodes: int | None = None,
        mode: str = "tree",
        weights: str = "fp32",
        window: int | str | None = None,
        sink: int | None = None,
        cost=None,
    ) -> None:
        m = "eagle"
        self.head = head
        self.window = _window(window, head.config)
        self.sink = head.config.sink if sink is None else as_int(m, "sink", sink, lo=0)
        self.k = as_int(m, "k", k, lo=1, hi=64)
        self.topk = as_int(m, "topk", topk, lo=1, hi=64)
        self.nodes = None if nodes is None else as_int(m, "nodes", nodes, lo=1)
        self.mode = as_choice(m, "mode", mode, ("tree", "chain"))
        self.weights = as_choice(m, "weights", weights, WEIGHTS_CHOICES)
        self.cost = cost
        self.ids = head.draft_ids
        self._ids = self.ids.tolist()  # target id of each draft id, without a tensor per lookup
        self.runner = HeadRunner(head, self.weights == "bf16")
        self._net = None
        self._ctx: DecodeContext | None = None
        self._len = 0  # real rows in the runner's cache
        self._start = 0  # target position of head row 0
        # rows dropped from a window's cache: real row r >= sink is at head position
        # r + _dropped (RoPE positions are head positions; full attention: always 0)
        self._dropped = 0
        self._real = 0  # real rows the runner's cache has room for
        self._pending: list[Tensor] = []  # target features of positions not yet run [n, 3D]
        self._h: Tensor | None = None  # the last real row's output hidden state [1, D]
        self._logits: Tensor | None = None  # [1, draft vocab]

    @classmethod
    def from_spec(
        cls, model, arg: str | None, params: dict, env: DraftEnv | None = None
    ) -> EagleDrafter:
        net = getattr(model, "net", model)
        name = getattr(model, "name", None) or "MODEL"
        spec = head_spec(arg, params.pop("head", None))
        folder = find_head(getattr(model, "path", None), spec)
        if folder is None or not (folder / "config.json").is_file():
            where = f" at {folder}" if folder is not None else f" for {name}"
            raise VeridraftError(
                f"eagle: no trained head{where}; train one with "
                f"`{train_hint(name)}` or pass eagle:head=PATH"
            )
        head = load_head(folder)
        check_head(head, net, str(folder), name)
        cost = env.cost(model) if env is not None and env.cost is not None else None
        return cls(head, cost=cost, **params)

    def __repr__(self) -> str:
        return (
            f"EagleDrafter(k={self.k}, topk={self.topk}, nodes={self.nodes}, mode={self.mode!r}, "
            f"weights={self.weights!r}, window={self.window}, sink={self.sink})"
        )

    # -- the captures --

    def prompt_capture(self) -> Capture:
        return Capture(hidden_layers=self.head.config.capture_layers)

    def verify_capture(self, ctx: DecodeContext) -> Capture:
        return Capture(hidden_layers=self.head.config.capture_layers)

    def _features(self, cap: Capture | None, rows: list[int] | None) -> Tensor | None:
        if cap is None or any(i not in cap.hidden for i in self.head.config.capture_layers):
            return None
        parts = [cap.hidden[i] for i in self.head.config.capture_layers]
        x = torch.cat(parts, -1)
        return x if rows is None else x[rows]

    # -- drafter protocol --

    def prefill(self, ctx: DecodeContext) -> None:
        self._ctx, self._net = ctx, ctx.target
        # the real rows, then a round's drafted rows: a chain's k, a tree's topk per level;
        # a window keeps sink + 2 x window real rows at most (+ a catch-up call's), but its
        # positions run to the end of the context
        drafted = self.k * self.topk
        positions = ctx.cache.max_len + 1 + drafted
        self._real = positions - drafted
        if self.window is not None:
            self._real = min(self._real, self.sink + 2 * self.window + CATCH_UP_ROWS)
        self.runner.reserve(self._real + drafted, positions)
        self._len, self._dropped, self._h, self._logits = 0, 0, None, None
        feats = self._features(ctx.prompt_capture, None)
        # without the prompt's features (prefilled earlier) the head starts at the first
        # verified position: it drafts from less context, verification is unchanged
        self._pending = [feats] if feats is not None else []
        self._start = 0 if feats is not None else len(ctx.ids) - 1

    def update(self, rnd: Round) -> None:
        feats = self._features(rnd.capture, [0, *(1 + i for i in rnd.path)])
        if feats is None:  # a round without features: start over from the next one
            self._len, self._dropped, self._pending, self._h = 0, 0, [], None
            self._start = len(rnd.ids) - 1
            return
        self._pending.append(feats)

    @torch.inference_mode()
    def propose(self, ctx: DecodeContext, max_tokens: int) -> Draft:
        if ctx is not self._ctx:
            self.prefill(ctx)
        self._catch_up(ctx.ids)
        if self._h is None or max_tokens <= 0:
            return Draft(tokens=[])
        if self.mode == "chain" or self.topk == 1:
            return self._chain(ctx, min(self.k, max_tokens))
        return self._tree(ctx, max_tokens)

    # -- head forwards --

    def _embed(self, ids: list[int]) -> Tensor:
        return self._net.embed(torch.tensor(ids, dtype=torch.long)).float()

    def _catch_up(self, ids: list[int]) -> None:
        """Run the pending target features through the head into its cache (real rows), at
        most CATCH_UP_ROWS a call: a long prompt's scores stay [kv, group x 256, cache rows]."""
        if not self._pending:
            return
        feats = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending = []
        a = self._start + self._dropped + self._len  # target position of the first pending row
        n = feats.shape[0]
        if a + n > len(ids) - 1:
            raise VeridraftError("eagle: captured features ran ahead of the committed ids")
        for c in range(0, n, CATCH_UP_ROWS):
            self._real_rows(feats[c : c + CATCH_UP_ROWS], ids, a + c)
        self._logits = self.runner.logits(self._h)

    def _real_rows(self, feats: Tensor, ids: list[int], a: int) -> None:
        """The head over real rows at target positions a .. into its cache: each row sees the
        earlier real rows (a window: the sink and the last `window` rows) and itself."""
        self._compact()
        run, lo, n = self.runner, self._len, feats.shape[0]
        if lo + n > self._real:
            raise VeridraftError("eagle: captured features ran ahead of the committed ids")
        hidden = run.fc(feats.float())
        emb = self._embed(ids[a + 1 : a + n + 1])
        pos = slice(lo + self._dropped, lo + self._dropped + n)
        if self.window is None:
            causal = None if n == 1 else torch.ones(n, n, dtype=torch.bool).tril()
            out = run.layer(hidden, emb, lo, pos, lo, causal)
        else:
            out = run.layer(hidden, emb, lo, pos, *_band(lo, n, self.window, self.sink))
        self._len += n
        self._h = out[-1:]

    def _compact(self) -> None:
        """A window's cache reaching sink + 2 x window rows keeps the sink and the last
        `window` rows (all any later row sees), moved down: one move per `window` rows."""
        w, s = self.window, self.sink
        if w is None or self._len < s + 2 * w:
            return
        src = self._len - w
        self.runner.move(src, s, w)
        self._dropped += src - s
        self._len = s + w

    def _hide(self) -> tuple[int, int] | None:
        """The real rows a round's drafted rows do not see: those between the sink and the last
        `window` real rows (as the last real row sees them)."""
        if self.window is None or self._len - self.window <= self.sink:
            return None
        return self.sink, self._len - self.window

    def _next_token(self, logits: Tensor, ctx: DecodeContext, qs: list[Tensor]) -> int:
        """A chain's next token from the head's draft-vocabulary logits: the argmax (greedy), or
        a sample from the target-vocabulary distribution, appended to qs (speculative
        sampling needs the q of every drafted token)."""
        if ctx.sampling.greedy:
            return self._ids[int(logits.argmax())]
        full = torch.full((self.head.config.vocab_size,), float("-inf"))
        full[self.ids] = logits
        q = probs(full, ctx.sampling)
        qs.append(q)
        return sample(q, ctx.generator)

    def _chain(self, ctx: DecodeContext, k: int) -> Draft:
        sampled = not ctx.sampling.greedy
        h, logits = self._h, self._logits[0]
        tokens: list[int] = []
        qs: list[Tensor] = []
        for i in range(k):
            tok = self._next_token(logits, ctx, qs)
            tokens.append(tok)
            if i + 1 < k:
                h, logits = self._chain_step(h, tok, i)
        return Draft(tokens=tokens, q=torch.stack(qs) if sampled else None)

    def _chain_step(self, h: Tensor, tok: int, i: int) -> tuple[Tensor, Tensor]:
        """The head over drafted row i (cache row lo + i, seeing the real rows the last one
        sees and the drafted rows before it): its hidden state and its draft-vocabulary
        logits."""
        run, lo = self.runner, self._len
        p = lo + self._dropped + i
        h = run.layer(h, self._embed([tok]), lo + i, slice(p, p + 1), lo, None, self._hide())
        return h, run.logits(h)[0]

    def _tree(self, ctx: DecodeContext, max_tokens: int) -> Draft:
        """EAGLE-2's dynamic tree: each level expands the `topk` most likely nodes by their
        `topk` best children; every node is a candidate, the most likely are verified. One
        head call per level, the level's nodes as its rows, each seeing its ancestors' rows."""
        run, lo, topk = self.runner, self._len, self.topk
        levels = min(self.k, max_tokens)
        nodes: list[Node] = []
        # the frontier: its nodes, and their output hidden states and logits as rows
        front, hid, lg = [-1], self._h, self._logits
        row_of: dict[int, int] = {}  # node -> its drafted row (0 = the first after lo)
        anc = torch.zeros(levels * topk, levels * topk, dtype=torch.bool)  # row sees row
        hide, at = self._hide(), lo + self._dropped  # at: the head position of row lo
        for depth in range(1, levels + 1):
            top = torch.log_softmax(lg, -1).topk(min(topk, lg.shape[-1]), -1)
            children: list[int] = []
            for j, vals, idx in zip(front, top.values.tolist(), top.indices.tolist()):
                logp = nodes[j].logp if j >= 0 else 0.0
                for v, i in zip(vals, idx):
                    nodes.append(Node(self._ids[i], j, logp + v, depth))
                    children.append(len(nodes) - 1)
            if depth == levels:
                break
            best = sorted(children, key=lambda j: -nodes[j].logp)[:topk]
            first = len(row_of)
            where = {j: r for r, j in enumerate(front)}
            take = torch.tensor([where[nodes[j].parent] for j in best])
            rows = torch.arange(first, first + len(best))
            if depth > 1:
                anc[rows] = anc[torch.tensor([row_of[nodes[j].parent] for j in best])]
            anc[rows, rows] = True
            for r, j in enumerate(best):
                row_of[j] = first + r
            end = first + len(best)
            pos = slice(at + depth - 1, at + depth)
            hid = run.layer(
                hid.index_select(0, take),
                self._embed([nodes[j].token for j in best]),
                lo + first,
                pos,
                lo,
                anc[first:end, :end],
                hide,
            )
            lg = run.logits(hid)
            front = best
        return self._pick(nodes, ctx, max_tokens)

    def _pick(self, nodes: list[Node], ctx: DecodeContext, max_tokens: int) -> Draft:
        """The tree's most likely nodes, prefix-closed, as a Draft."""
        order = sorted(range(len(nodes)), key=lambda j: (-nodes[j].logp, nodes[j].depth, j))
        picked: list[int] = []
        where: dict[int, int] = {}
        for j in order:  # prefix-closed: a node only after its parent
            if nodes[j].parent < 0 or nodes[j].parent in where:
                where[j] = len(picked)
                picked.append(j)
        path_probs = [math.exp(nodes[j].logp) for j in picked]
        n = len(picked)
        if self.nodes is not None:
            n = min(n, self.nodes)
        elif self.cost is not None:
            n = self.cost.best_nodes(path_probs, context=len(ctx.ids))
        else:
            n = min(n, DEFAULT_NODES)
        n = min(n, max_tokens)
        picked = picked[:n]
        tokens = [nodes[j].token for j in picked]
        parents = [-1 if nodes[j].parent < 0 else where[nodes[j].parent] for j in picked]
        if not tokens:
            return Draft(tokens=[])
        if parents == list(range(-1, n - 1)):
            return Draft(tokens=tokens)
        return Draft(tokens=tokens, parents=parents)


DEFAULT_NODES = 12  # tree size without a cost profile: small trees suit a CPU verifier


def _window(value, c: HeadConfig) -> int | None:
    """The drafter's window: an int >= 1, "full"/"none" (every row), None: the head's own."""
    if value is None:
        return c.window
    if isinstance(value, str) and value.strip().lower() in ("full", "none"):
        w = None
    else:
        w = as_int("eagle", "window", value, lo=1)
    if c.window is not None and w != c.window:
        # allowed (output stays exact: the target verifies), but the head learnt another span
        warnings.warn(
            f"eagle: the head was trained for window={c.window}, drafting with window={w}: its "
            "attention sees other rows than in training, so it may accept less",
            stacklevel=4,
        )
    return w


def _band(lo: int, n: int, window: int, sink: int) -> tuple[int, Tensor, tuple[int, int] | None]:
    """HeadRunner.layer's (free, mask, hide) for real rows lo .. lo + n - 1 under a window:
    row j sees rows r < sink and j - window < r <= j."""
    left = max(0, lo - window + 1)  # the first row past the sink that row lo still sees
    free = min(lo, max(sink, left))
    j = torch.arange(lo, lo + n)[:, None]
    c = torch.arange(free, lo + n)[None]
    mask = (c <= j) & ((c > j - window) | (c < sink))
    return free, mask, ((sink, free) if free > sink else None)


def head_summary(head: EagleHead) -> dict:
    c = asdict(head.config)
    c.pop("meta")
    return c
