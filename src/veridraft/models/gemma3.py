"""Gemma 3 text decoder (`gemma3_text`).

Against Llama: embeddings scaled by sqrt(dim), (1 + w) RMSNorms (folded into the weights at
load), norms before *and* after attention and MLP, q/k norms, GeGLU (tanh) MLP, attention scale
from query_pre_attn_scalar, sliding-window local layers with their own rope theta between global
layers, optional logit softcapping.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    Attention,
    GatedMLP,
    ModelConfig,
    RMSNorm,
    Step,
    Transformer,
    attention_tensors,
    mlp_tensors,
)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope_index: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer, rope_index)
        self.post_attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.pre_ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = GatedMLP(cfg, partial(F.gelu, approximate="tanh"))
        self.post_ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, step: Step, do_attn: bool, do_mlp: bool) -> Tensor:
        if do_attn:
            x = x + self.post_attention_norm(self.attention(self.input_norm(x), step))
        if do_mlp:
            x = x + self.post_ffn_norm(self.feed_forward(self.pre_ffn_norm(x)))
        return x


class Gemma3(Transformer):
    def __init__(self, config: ModelConfig, precision: str = "fp32") -> None:
        super().__init__(config, precision)
        self.layers = nn.ModuleList(
            Block(config, i, self.rope_of_layer[i]) for i in range(config.n_layers)
        )
        self.embed_scale: Tensor | None = None

    def embed(self, tokens: Tensor) -> Tensor:
        w = self.tok_embeddings.weight
        if self.embed_scale is None:
            # HF rounds sqrt(dim) to the embedding dtype (float32 here) before multiplying; a
            # packed precision's 16-bit table is widened first, the scale stays float32
            self.embed_scale = torch.tensor(self.config.dim**0.5, device="cpu")
        return F.embedding(tokens, w).float() * self.embed_scale

    def convert(self, take: Any) -> dict[str, Tensor]:
        cfg = self.config

        def norm(name: str) -> Tensor:
            return take(name) + 1.0

        sd = {"tok_embeddings.weight": take("model.embed_tokens.weight")}
        sd["norm.weight"] = norm("model.norm.weight")
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"model.layers.{i}."
            sd[p + "input_norm.weight"] = norm(h + "input_layernorm.weight")
            sd[p + "post_attention_norm.weight"] = norm(h + "post_attention_layernorm.weight")
            sd[p + "pre_ffn_norm.weight"] = norm(h + "pre_feedforward_layernorm.weight")
            sd[p + "post_ffn_norm.weight"] = norm(h + "post_feedforward_layernorm.weight")
            sd.update(attention_tensors(take, cfg, i, p + "attention.", norm_offset=1.0))
            sd.update(mlp_tensors(take, cfg, i, p + "feed_forward."))
        return sd
