"""A tiny random Qwen2-VL / Qwen2.5-VL written the way llama.cpp's converter writes the pair: the
language model's GGUF (architecture "qwen2vl", a byte-level BPE tokenizer holding Qwen's vision
tokens) and the mmproj (architecture "clip"), beside the HF folder of the same weights.

The GGUF names come from gguf's own tensor name tables (what the converter maps with), not from
veridraft's reader, so a test of the reader checks it against the converter's naming. The
decoder's matrices are quantized blocks and the tower's F16, as in released files; the HF folder
holds exactly the values those de-quantize to, so every mode can be compared bit for bit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from veridraft.vision import processor as P

_spec = importlib.util.spec_from_file_location(
    "vision_conftest", Path(__file__).parents[1] / "vision" / "conftest.py"
)
_vision = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vision)
make_hf = _vision.make_hf  # the tiny random models of the vision tests

# the tokenizer: 256 byte tokens, one merge ("he"), then the specials in Qwen's order
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
ID = {s: 257 + i for i, s in enumerate(SPECIALS)}
VOCAB = 272  # rows past the tokens, as released models pad their tables (q4's kernel: 16 | N)
START, END = ID["<|vision_start|>"], ID["<|vision_end|>"]
IMAGE, VIDEO = ID["<|image_pad|>"], ID["<|video_pad|>"]
TOKENS = dict(vision_start_token_id=START, image_token_id=IMAGE, video_token_id=VIDEO)
TOKENS["vision_end_token_id"] = END

# decoder matrices: a mix of the block types released GGUFs use
KINDS = {"token_embd": "Q8_0", "attn_v": "Q8_0", "ffn_down": "Q4_1", "output": "Q8_0"}


def _byte_tokens() -> list[str]:
    """GPT-2's byte -> printable character table (the vocabulary of byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def make_hf_model(family: str, seed: int):
    """The tiny model with this tokenizer's vocabulary and ids, 32-column-divisible linears (q4
    blocks) and Qwen2.5-VL's released 112-px windows (the size a real mmproj leaves implied)."""
    hf = make_hf(family, seed, tokens=TOKENS, vocab_size=VOCAB, intermediate_size=64)
    if family == "qwen2_5_vl":
        hf.config.vision_config.window_size = 112
    return hf


def _quantized(w: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, object]:
    """(the bytes to store, the float32 values they de-quantize to, raw dtype for the writer)."""
    t = GGMLQuantizationType[kind]
    if t == GGMLQuantizationType.F32:
        return w, w, None
    if t == GGMLQuantizationType.F16:
        h = w.astype(np.float16)
        return h, h.astype(np.float32), None
    blocks = quants.quantize(w, t)
    return blocks, quants.dequantize(blocks, t).reshape(w.shape).astype(np.float32), t


def write_pair(hf, out: Path, family: str, kinds=None, name: str = "tiny", swap=(), skip=()):
    """Write `hf` as (out/NAME.gguf, out/mmproj-NAME-f16.gguf), replacing its weights by the
    values the files de-quantize to; then save the HF folder out/hf. Returns the three paths.
    `swap`: two GGUF tensor names of the same shape, each written under the other's name (a
    broken file, for the tests that must fail); `skip`: mmproj metadata keys left out."""
    kinds = {**KINDS, **(kinds or {})}
    other = dict(zip(swap, reversed(swap), strict=True))
    out.mkdir(parents=True, exist_ok=True)
    text_cfg = hf.config.get_text_config()
    vis_cfg = hf.config.vision_config
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    lm = "model.language_model."
    tied = hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    layers = text_cfg.num_hidden_layers
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2VL, layers)
    # the merger's mm.0 / mm.2 are indexed like blocks: a 2-block tower needs the table of 3
    vmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(vis_cfg.depth, 3))
    new: dict[str, np.ndarray] = {}

    # the language model
    w = GGUFWriter(out / f"{name}.gguf", "qwen2vl")
    w.add_block_count(layers)
    w.add_context_length(text_cfg.max_position_embeddings)
    w.add_embedding_length(text_cfg.hidden_size)
    w.add_feed_forward_length(text_cfg.intermediate_size)
    w.add_head_count(text_cfg.num_attention_heads)
    w.add_head_count_kv(text_cfg.num_key_value_heads)
    w.add_rope_freq_base(float(text_cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(text_cfg.rms_norm_eps)
    section = list(text_cfg.rope_parameters["mrope_section"])
    w.add_rope_dimension_sections(section + [0] * (4 - len(section)))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    pads = [f"[PAD{i}]" for i in range(257 + len(SPECIALS), VOCAB)]  # as llama.cpp pads
    w.add_token_list([*_byte_tokens(), "he", *SPECIALS, *pads])
    w.add_token_types([1] * 257 + [3] * len(SPECIALS) + [5] * len(pads))
    w.add_token_merges(["h e"])
    w.add_eos_token_id(ID["<|im_end|>"])
    w.add_bos_token_id(ID["<|endoftext|>"])
    w.add_add_bos_token(False)
    for key in sorted(sd):
        if not (key.startswith(lm) or key == "lm_head.weight"):
            continue
        if key == "lm_head.weight" and tied:
            continue
        hf_name = key.replace(lm, "model.", 1)
        stem, suffix = hf_name.rsplit(".", 1)
        g = tmap.get_name(stem)
        assert g is not None, hf_name
        a = sd[key]
        kind = "F32" if a.ndim == 1 else kinds.get(g.split(".")[-1], "Q4_0")
        data, values, raw = _quantized(a, kind)
        w.add_tensor(other.get(f"{g}.{suffix}", f"{g}.{suffix}"), data, raw_dtype=raw)
        new[key] = values
    _close(w)

    # the vision tower: q, k, v split out of qkv, the Conv3d's two temporal slices
    m = GGUFWriter(out / f"mmproj-{name}-f16.gguf", "clip")
    m.add_type("mmproj")
    m.add_bool("clip.has_vision_encoder", True)
    proj = "qwen2.5vl_merger" if family == "qwen2_5_vl" else "qwen2vl_merger"
    m.add_string("clip.projector_type", proj)
    v = "clip.vision."
    embed = vis_cfg.hidden_size if family == "qwen2_5_vl" else vis_cfg.embed_dim
    # the converter's feed_forward_length of a Qwen2-VL tower is its config's hidden_size
    ffn = vis_cfg.intermediate_size if family == "qwen2_5_vl" else vis_cfg.hidden_size
    m.add_uint32(v + "projection_dim", text_cfg.hidden_size)
    m.add_uint32(v + "image_size", 560)
    m.add_uint32(v + "patch_size", vis_cfg.patch_size)
    m.add_uint32(v + "embedding_length", embed)
    m.add_uint32(v + "feed_forward_length", ffn)
    m.add_uint32(v + "block_count", vis_cfg.depth)
    m.add_uint32(v + "attention.head_count", vis_cfg.num_heads)
    m.add_array(v + "image_mean", list(P.IMAGE_MEAN))
    m.add_array(v + "image_std", list(P.IMAGE_STD))
    m.add_float32(v + "attention.layer_norm_epsilon", 1e-6)
    if family == "qwen2_5_vl":
        m.add_bool("clip.use_silu", True)
        if v + "n_wa_pattern" not in skip:
            m.add_uint32(v + "n_wa_pattern", vis_cfg.fullatt_block_indexes[0] + 1)
    for key in sorted(sd):
        if not key.startswith("model.visual."):
            continue
        hf_name = key.replace("model.visual.", "visual.", 1)
        stem, suffix = hf_name.rsplit(".", 1)
        a = sd[key]
        kind = "F32" if a.ndim == 1 else "F16"
        if stem.endswith(".qkv"):
            parts = np.split(a, 3)
            vals = []
            for p, piece in zip("qkv", parts, strict=True):
                data, value, raw = _quantized(np.ascontiguousarray(piece), kind)
                gname = f"{vmap.get_name(stem[:-3] + p)}.{suffix}"
                m.add_tensor(other.get(gname, gname), data, raw_dtype=raw)
                vals.append(value)
            new[key] = np.concatenate(vals)
        elif stem.endswith("patch_embed.proj"):
            base = vmap.get_name(stem)
            vals = []
            for i, tail in enumerate(("", ".1")):
                piece = np.ascontiguousarray(a[:, :, i])
                data, value, raw = _quantized(piece, kind)
                gname = f"{base}.{suffix}{tail}"
                m.add_tensor(other.get(gname, gname), data, raw_dtype=raw)
                vals.append(value)
            new[key] = np.stack(vals, axis=2)
        else:
            g = vmap.get_name(stem)
            assert g is not None, hf_name
            data, value, raw = _quantized(a, kind)
            m.add_tensor(other.get(f"{g}.{suffix}", f"{g}.{suffix}"), data, raw_dtype=raw)
            new[key] = value
    _close(m)

    with torch.no_grad():  # the HF model now holds what the files hold
        params = dict(hf.named_parameters())
        for key, value in new.items():
            params[key].copy_(torch.from_numpy(value))
    hf.save_pretrained(out / "hf")
    return out / "hf", out / f"{name}.gguf", out / f"mmproj-{name}-f16.gguf"


def _close(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- prompts: ids with media, as tests/vision/test_vision_language.py builds them ----


def image() -> P.VisionInput:
    """A 190x250 picture: 8x10 merged tokens, several 112-px windows."""
    rng = np.random.default_rng(1)
    return P.process_image(rng.integers(0, 256, (190, 250, 3), dtype=np.uint8))


def video() -> P.VisionInput:
    """Five generated frames of 87x150: padded to 6 frames, 3 temporal patches."""
    rng = np.random.default_rng(2)
    frames = list(rng.integers(0, 256, (5, 87, 150, 3), dtype=np.uint8))
    return P.process_video(frames, fps=3.0, min_pixels=784, max_pixels=24 * 784)


def prompt_of(items: list[P.VisionInput]) -> list[int]:
    ids = [10, 11, 12]
    for it in items:
        pad = IMAGE if it.kind == "image" else VIDEO
        ids += [START] + [pad] * it.num_tokens + [END, 13, 14]
    return ids + [20, 21, 22, 23]
