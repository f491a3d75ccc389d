"""What a native model is, read from an HF config.json: `ModelConfig`, its rope parameters, and
the names HF checkpoints give the tensors a native linear is fused from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VeridraftError

FULL, SLIDING = "full_attention", "sliding_attention"
SUPPORTED_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma3_text": "gemma3",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
}
# the architectures whose prompts may hold images and video (models/qwen2_vl.py)
MULTIMODAL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def architectures() -> list[tuple[str, bool]]:
    """(HF model_type, reads images and video) of every architecture veridraft runs."""
    return [(mt, mt in MULTIMODAL_MODEL_TYPES) for mt in SUPPORTED_MODEL_TYPES]


# the Qwen2 text decoder (q/k/v bias, optional sliding window) under each of its model types
_QWEN2_TEXT = ("qwen2", "qwen2_vl", "qwen2_5_vl")


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
    # M-RoPE (Qwen2-VL): frequency pairs per (t, h, w) position stream; None = plain RoPE
    mrope_section: list[int] | None = None
    # a vision-language checkpoint's own keys (vision_config, image/video token ids), else None
    vision: dict[str, Any] | None = None

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
        vision = None
        if mt in MULTIMODAL_MODEL_TYPES:
            # transformers 5 nests the decoder under text_config, 4 keeps it at the top level
            top = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
            vision = {**top, "vision_config": dict(cfg.get("vision_config") or {})}
            cfg = {**top, **dict(cfg.get("text_config") or {}), "model_type": mt}
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
        if mt in (*_QWEN2_TEXT, "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        types = cfg.get("layer_types")
        if gemma and not types:
            pattern = int(cfg.get("sliding_window_pattern", 6))
            types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
        elif mt in (*_QWEN2_TEXT, "qwen3") and window and not types:
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
        rope = rope_params(cfg, gemma)
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
            qkv_bias=mt in _QWEN2_TEXT or bool(cfg.get("attention_bias", False)),
            o_bias=mt not in _QWEN2_TEXT and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=mt in ("qwen3", "gemma3_text"),
            sliding_window=int(window) if window else None,
            layer_types=list(types),
            rope=rope,
            attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None,
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            mrope_section=mrope_section(rope, head_dim),
            vision=vision,
        )


def rope_params(cfg: dict[str, Any], gemma: bool) -> dict[str, dict[str, Any]]:
    """Per layer type (FULL, SLIDING), the HF rope parameters of a config.json dict, with
    rope_type and rope_theta always set."""
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
        if p["rope_type"] not in ("default", "linear", "llama3", "mrope"):
            raise VeridraftError(
                f"unsupported rope_type {p['rope_type']!r} (default, linear, llama3, mrope)"
            )
    return out


def mrope_section(rope: dict[str, dict[str, Any]], head_dim: int) -> list[int] | None:
    """M-RoPE's split of the head's frequency pairs over the (t, h, w) streams, or None.

    Qwen2-VL configs write rope_type "mrope" (transformers 4) or keep "default" with an
    mrope_section beside it (transformers 5); either way the frequencies are the default ones."""
    p = rope[FULL]
    section = p.get("mrope_section")
    if section is None:
        if p["rope_type"] == "mrope":
            raise VeridraftError("rope_type 'mrope' needs an mrope_section; re-convert the model")
        return None
    section = [int(s) for s in section]
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise VeridraftError(
            f"mrope_section {section} must be 3 numbers summing to head_dim/2 = {head_dim // 2}; "
            "fix the config's rope parameters"
        )
    return section


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


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VeridraftError(f"cannot read {path}: {e}; re-pull or re-convert the model") from e
