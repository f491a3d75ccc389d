"""Tiny models in the packed precision modes for the press tests: a random Llama with two KV
heads (so that head-wise budgets really differ per head) in bf16, and the same shape written as
a GGUF of Q4_1 blocks for q4 / q4a8 (models/q4.py), as tests/models/test_q4.py builds its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from drafting_helpers import tiny_llama
from gguf import GGMLQuantizationType, GGUFWriter, quants

from veridraft.models import from_hf_config_and_state_dict
from veridraft.models.precision import apply_precision
from veridraft.models.q4 import _llama_rows, apply_q4

DIM, INTER, HEADS, KV, VOCAB = 64, 128, 4, 2, 32
HD = DIM // HEADS


def tiny_bf16(folder: Path, seed: int = 3, layers: int = 4):
    """tiny_llama (4 query heads, 2 KV heads, vocab 16) in bf16."""
    return apply_precision(tiny_llama(folder, seed=seed, layers=layers), "bf16")


def tiny_q4(folder: Path, a8: bool = False, layers: int = 4, seed: int = 0, std: float = 0.15):
    """A tied Llama (dim 64, 4 heads, 2 KV heads, vocab 32) whose matrices are Q4_1 blocks of
    a GGUF written here, in q4 (a8: q4a8). Layer weights of `std` 0.15 leave its greedy text
    repetitive enough for n-gram drafts to be accepted now and then."""
    g = np.random.default_rng(seed)
    path = folder / "tiny.gguf"
    writer = GGUFWriter(path, "llama")
    sd: dict[str, torch.Tensor] = {}
    shapes = {
        "attn_q": ("self_attn.q_proj.weight", HEADS * HD, DIM),
        "attn_k": ("self_attn.k_proj.weight", KV * HD, DIM),
        "attn_v": ("self_attn.v_proj.weight", KV * HD, DIM),
        "attn_output": ("self_attn.o_proj.weight", DIM, HEADS * HD),
        "ffn_gate": ("mlp.gate_proj.weight", INTER, DIM),
        "ffn_up": ("mlp.up_proj.weight", INTER, DIM),
        "ffn_down": ("mlp.down_proj.weight", DIM, INTER),
    }
    named = [("token_embd.weight", "model.embed_tokens.weight", "token_embd", VOCAB, DIM, 1.0)]
    for i in range(layers):
        for short, (hf, rows, cols) in shapes.items():
            named.append(
                (f"blk.{i}.{short}.weight", f"model.layers.{i}.{hf}", short, rows, cols, 0.3)
            )
    kind = GGMLQuantizationType.Q4_1
    for gname, hname, short, rows, cols, scale in named:
        w = (g.standard_normal((rows, cols)) * scale).astype(np.float32)
        blocks = quants.quantize(w, kind)
        deq = quants.dequantize(blocks, kind).reshape(rows, cols)
        if short in ("attn_q", "attn_k"):  # llama.cpp's rotary row order (as test_q4.py)
            order = _llama_rows(rows, HEADS if short == "attn_q" else KV)
            stored = np.empty_like(blocks)
            stored[order] = blocks
            blocks = stored
        writer.add_tensor(gname, blocks, raw_dtype=kind)
        sd[hname] = torch.from_numpy(deq)
    for i in range(layers):
        for n in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{i}.{n}.weight"] = torch.ones(DIM) + 0.1 * torch.randn(DIM)
    sd["model.norm.weight"] = torch.ones(DIM)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cfg = {
        "model_type": "llama",
        "hidden_size": DIM,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "vocab_size": VOCAB,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }
    model = from_hf_config_and_state_dict(cfg, sd)
    return apply_q4(model, path, a8=a8)
