"""Llama family: Llama 2/3 (SmolLM2), Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k norm).

The differences are flags in ModelConfig (biases, q/k norm, sliding windows, rope scaling);
the block is the same pre-norm attention + SwiGLU MLP for all of them.
"""

from __future__ import annotations

from typing import Any

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
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer, rope_index)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = GatedMLP(cfg, F.silu)

    def forward(self, x: Tensor, step: Step, do_attn: bool, do_mlp: bool) -> Tensor:
        if do_attn:
            x = x + self.attention(self.attention_norm(x), step)
        if do_mlp:
            x = x + self.feed_forward(self.ffn_norm(x))
        return x


class Llama(Transformer):
    def __init__(self, config: ModelConfig, precision: str = "fp32") -> None:
        super().__init__(config, precision)
        self.layers = nn.ModuleList(
            Block(config, i, self.rope_of_layer[i]) for i in range(config.n_layers)
        )

    def convert(self, take: Any) -> dict[str, Tensor]:
        cfg = self.config
        sd = {"tok_embeddings.weight": take("model.embed_tokens.weight")}
        sd["norm.weight"] = take("model.norm.weight")
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"model.layers.{i}."
            sd[p + "attention_norm.weight"] = take(h + "input_layernorm.weight")
            sd[p + "ffn_norm.weight"] = take(h + "post_attention_layernorm.weight")
            sd.update(attention_tensors(take, cfg, i, p + "attention."))
            sd.update(mlp_tensors(take, cfg, i, p + "feed_forward."))
        return sd
