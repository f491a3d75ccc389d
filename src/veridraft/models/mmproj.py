"""A Qwen2-VL / Qwen2.5-VL model as llama.cpp's converter writes it: the language model's GGUF
(architecture "qwen2vl") and, with `--mmproj`, a second GGUF holding the vision tower (the
"mmproj", architecture "clip").

model = veridraft.load("Qwen2.5-VL-3B-Instruct-Q4_K_M.gguf", mmproj="mmproj-...-f16.gguf")
model = veridraft.load("folder/")  # a folder holding the GGUF and its mmproj-*.gguf

What the files hold, and how it maps back to the HF names the rest of veridraft reads:

- the GGUF: the Qwen2 decoder under llama.cpp's usual tensor names (blk.N.attn_q, ...; the q/k
  rows are not permuted for this architecture), `qwen2vl.rope.dimension_sections` =
  mrope_section + [0], the tokenizer and the chat template. It has no vision keys: the image,
  video and vision-start ids are its vocabulary's <|image_pad|>, <|video_pad|>, <|vision_start|>.
- the mmproj: `clip.projector_type` "qwen2vl_merger" (Qwen2-VL: LayerNorm, quick_gelu MLP, full
  attention) or "qwen2.5vl_merger" (Qwen2.5-VL: RMSNorm, SiLU-gated MLP, window attention), the
  tower's sizes under `clip.vision.*`, and for 2.5-VL `clip.vision.n_wa_pattern` n: block b
  attends over the whole frame when (b + 1) % n == 0, inside windows otherwise. Tensors:
  `v.patch_embd.weight` and `v.patch_embd.weight.1` (the Conv3d's two temporal slices),
  `v.blk.N.{ln1, attn_q, attn_k, attn_v, attn_out, ln2, ffn_gate, ffn_up, ffn_down}` (q, k, v
  split out of the fused qkv), `v.post_ln` (the merger's ln_q), `mm.0` and `mm.2` (its MLP).

Not in the files, fixed in llama.cpp's code and taken the same here: windows of 112 px (unless
`clip.vision.window_size` says otherwise), the 2x2 merge, the tower's rope theta 10000. The
time positions of a 2.5-VL video use tokens_per_second 2, every released Qwen2.5-VL's value.

`pair_folder` reads the pair's config and tokenizer out once into a model folder (as
loader.gguf_folder does for a text GGUF; veridraft.json records both paths). The tensors stay
in the two files: q4 / q4a8 run the decoder's own blocks, the float modes de-quantize the
decoder as they load it (no float32 copy is written), and every mode de-quantizes the tower to
float32 (`tower_tensors`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import VeridraftError
from . import catalog, convert

TEXT_ARCH = "qwen2vl"  # general.architecture of both families' language-model GGUF
CLIP_ARCH = "clip"  # ... and of an mmproj
# clip.projector_type -> the HF model_type of the family
PROJECTORS = {"qwen2vl_merger": "qwen2_vl", "qwen2.5vl_merger": "qwen2_5_vl"}
_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
WINDOW_SIZE = 112  # pixels: Qwen2.5-VL's windows, a constant in llama.cpp's tower
MERGE_SIZE = 2
TOKENS_PER_SECOND = 2
MMPROJ_FLAG = "mmproj=PATH (veridraft generate --mmproj PATH)"
_VISION_TOKENS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}


# ---------------------------------------------------------------------------------------------
# metadata

_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8"}
_NUMPY |= {11: "<i8", 12: "<f8"}


def read_metadata(path: str | os.PathLike, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """A GGUF's metadata: scalars, strings and numeric arrays (as lists). The tokenizer's big
    arrays (tokenizer.ggml.*) are skipped. `only`: stop once these keys are read (llama.cpp
    writes general.architecture first, so asking for it reads a few bytes)."""
    path = Path(path)
    try:
        return _read_metadata(path, only)
    except VeridraftError:
        raise
    except Exception as e:  # struct and unicode errors of a truncated or corrupt file
        raise VeridraftError(
            f"{path} is not a valid GGUF file (truncated or corrupt: {type(e).__name__}): "
            "re-download or re-convert it"
        ) from e


def _read_metadata(path: Path, only: tuple[str, ...]) -> dict[str, Any]:
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    mv = memoryview(buf)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        out = struct.unpack_from("<" + fmt, mv, pos)
        pos += struct.calcsize("<" + fmt)
        return out[0]

    def string(keep: bool = True) -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        if pos > len(buf):
            raise ValueError("a string runs past the end")
        return bytes(mv[pos - n : pos]).decode("utf-8", "replace") if keep else ""

    def value(vtype: int, keep: bool):
        nonlocal pos
        if vtype == 8:
            return string(keep)
        if vtype != 9:
            return take(convert.SCALAR_FORMAT[vtype])
        etype, count = take("I"), take("Q")
        if etype in _NUMPY:
            size = np.dtype(_NUMPY[etype]).itemsize
            a = np.frombuffer(buf, _NUMPY[etype], count, pos) if keep else None
            pos += count * size
            return a.tolist() if a is not None else None
        return [value(etype, keep) for _ in range(count)]

    if len(buf) < 24 or bytes(mv[:4]) != b"GGUF":
        raise VeridraftError(f"{path} is not a GGUF file (no GGUF magic): give a .gguf file")
    pos = 4
    _, _, n_kv = take("I"), take("Q"), take("Q")
    out: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        keep = not key.startswith("tokenizer.ggml.")
        v = value(take("I"), keep)
        if keep:
            out[key] = v
        if only and all(k in out for k in only):
            break
    return out


def architecture(path: str | os.PathLike) -> str:
    """general.architecture of a GGUF: "" when it has none or cannot be read (the caller's own
    checks then name what is wrong with the file)."""
    try:
        meta = read_metadata(path, only=("general.architecture",))
    except VeridraftError:
        return ""
    return str(meta.get("general.architecture", ""))


# ---------------------------------------------------------------------------------------------
# finding the pair


def find_mmproj(gguf: Path) -> Path | None:
    """The mmproj beside a Qwen2-VL GGUF (a GGUF of architecture "clip" in its folder), None
    when there is none; an error when there are several."""
    found = [p for p in sorted(gguf.parent.glob("*.gguf")) if p != gguf and _is_clip(p)]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise VeridraftError(
            f"{gguf.parent} holds several mmproj files ({names}): name the one to use with "
            f"{MMPROJ_FLAG}"
        )
    return found[0] if found else None


def _is_clip(path: Path) -> bool:
    return architecture(path) == CLIP_ARCH


def find_pair(folder: Path) -> tuple[Path, Path | None] | None:
    """(the model GGUF, its mmproj) of a folder of llama.cpp files without config.json; None
    when the folder holds no GGUF. An error when it holds several model GGUFs."""
    ggufs = sorted(folder.glob("*.gguf"))
    models = [p for p in ggufs if not _is_clip(p)]
    if not models:
        return None
    if len(models) > 1:
        names = ", ".join(p.name for p in models)
        raise VeridraftError(
            f"{folder} holds several model GGUFs ({names}): give the path of the one to load"
        )
    return models[0], find_mmproj(models[0])


def no_mmproj(gguf: Path) -> VeridraftError:
    return VeridraftError(
        f"{gguf} is the language model of a Qwen2-VL / Qwen2.5-VL GGUF pair and no mmproj is "
        f"beside it: give its vision tower GGUF (llama.cpp's convert_hf_to_gguf.py --mmproj "
        f"writes it) with {MMPROJ_FLAG}"
    )


# ---------------------------------------------------------------------------------------------
# the pair -> a model folder (config.json, tokenizer), once


def pair_folder(gguf: str | os.PathLike, mmproj: str | os.PathLike | None = None) -> Path:
    """The folder of a GGUF + mmproj pair: the config and tokenizer read out once into
    $VERIDRAFT_HOME/models/gguf-<sha256[:16]>-<mmproj sha256[:8]>/ (the files stay where they
    are; veridraft.json records both paths); return it. mmproj None: the one beside the GGUF."""
    gguf = Path(gguf).expanduser().resolve()
    arch = architecture(gguf)
    if arch == CLIP_ARCH:
        raise VeridraftError(
            f"{gguf} is an mmproj (a vision tower): load the language model's GGUF and give "
            f"this file with {MMPROJ_FLAG}"
        )
    if arch != TEXT_ARCH:
        convert.check_gguf(gguf)  # a file that is no whole GGUF fails here, saying so
        raise VeridraftError(
            f"mmproj is the vision tower of a Qwen2-VL / Qwen2.5-VL GGUF and {gguf} is a "
            f"{arch!r} model: load it without mmproj"
        )
    if mmproj is None:
        mmproj = find_mmproj(gguf)
        if mmproj is None:
            raise no_mmproj(gguf)
    mmproj = Path(mmproj).expanduser().resolve()
    if not mmproj.is_file():
        raise VeridraftError(f"mmproj {mmproj} does not exist: give the path of the mmproj GGUF")
    sha, msha = convert.sha256_file(gguf), convert.sha256_file(mmproj)
    final = catalog.models_dir() / f"gguf-{sha[:16]}-{msha[:8]}"
    if catalog.is_complete(final):
        # the same bytes may have moved since
        catalog.record_paths(final, source_path=gguf, mmproj_path=mmproj)
        return final
    catalog.log(f"reading the config and tokenizer of {gguf} and {mmproj.name} into {final} (once)")
    with catalog.staging_dir(final) as tmp:
        write_pair_metadata(gguf, mmproj, tmp, name=gguf.stem, sha=sha, mmproj_sha=msha)
    return final


def write_pair_metadata(
    gguf: Path, mmproj: Path, out_dir: Path, *, name: str, sha: str, mmproj_sha: str
) -> Path:
    """config.json (the HF layout of transformers 4: decoder keys at the top, vision_config),
    generation_config.json, the tokenizer files, then veridraft.json (it marks the folder
    whole); return out_dir."""
    text, tower = read_metadata(gguf), read_metadata(mmproj)
    tt = convert.read_gguf(gguf, fix="re-download or re-convert the GGUF").tensors
    mt = convert.read_gguf(mmproj, fix="re-download or re-convert the mmproj").tensors
    family = check_mmproj(mmproj, tower, mt)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _write_tokenizer(gguf, out_dir)
    vocab = tok.get_vocab()
    ids = {}
    for key, token in _VISION_TOKENS.items():
        if token not in vocab:
            raise VeridraftError(
                f"{gguf}'s vocabulary has no {token} token: it is not a Qwen2-VL / Qwen2.5-VL "
                "language model"
            )
        ids[key] = int(vocab[token])
    cfg = hf_config(gguf, text, tt, mmproj, tower, mt, family)
    cfg.update(ids)
    for key, tok_key in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token")):
        token = getattr(tok, tok_key, None)
        if token is not None and token in vocab:
            cfg[key] = int(vocab[token])
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    meta = {
        "name": name,
        "source_file": gguf.name,
        "source_sha256": sha,
        "source_bytes": gguf.stat().st_size,
        "source_architecture": TEXT_ARCH,
        "source_path": str(gguf),
        "mmproj_file": mmproj.name,
        "mmproj_sha256": mmproj_sha,
        "mmproj_path": str(mmproj),
        "packages": [],
        "converted_with": _versions(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    (out_dir / catalog.MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def _write_tokenizer(gguf: Path, out_dir: Path):
    """The GGUF's tokenizer as HF files: transformers builds it from tokenizer.ggml.* (it has no
    config mapping for this architecture, so the tokenizer class is asked directly, from a
    folder holding the GGUF alone: it would also read tokenizer files lying beside it)."""
    import tempfile
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers
        from transformers import PreTrainedTokenizerFast

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with tempfile.TemporaryDirectory(prefix="veridraft-gguf-") as tmp:
            link = Path(tmp) / gguf.name
            link.symlink_to(gguf)
            tok = PreTrainedTokenizerFast.from_pretrained(tmp, gguf_file=link.name)
            tok.save_pretrained(out_dir)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise VeridraftError(
            f"transformers {transformers.__version__} cannot read the tokenizer of {gguf} "
            f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); re-convert "
            "the model with llama.cpp"
        ) from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    return tok


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("transformers", "gguf", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def check_mmproj(path: Path, meta: dict[str, Any], tensors: Mapping) -> str:
    """The family ("qwen2_vl" or "qwen2_5_vl") of an mmproj; a one-line error when it is not
    one veridraft reads."""
    arch = meta.get("general.architecture")
    if arch != CLIP_ARCH:
        raise VeridraftError(
            f"{path} is not an mmproj (its architecture is {arch!r}, an mmproj's is 'clip'): "
            "give the mmproj-*.gguf llama.cpp's converter wrote with --mmproj"
        )
    proj = meta.get("clip.vision.projector_type", meta.get("clip.projector_type"))
    if proj not in PROJECTORS:
        raise VeridraftError(
            f"{path} has projector type {proj!r}; veridraft reads "
            f"{' and '.join(map(repr, PROJECTORS))} (Qwen2-VL, Qwen2.5-VL): use one of those"
        )
    if "v.patch_embd.weight.1" not in tensors or "v.patch_embd.weight" not in tensors:
        raise VeridraftError(
            f"{path} lacks v.patch_embd.weight or v.patch_embd.weight.1 (the patch embedding's "
            "two temporal slices): re-convert the mmproj with llama.cpp"
        )
    return PROJECTORS[proj]


def _shape(tensors: Mapping, name: str, where: Path) -> tuple[int, ...]:
    """A tensor's shape in torch order (rows first)."""
    if name not in tensors:
        raise VeridraftError(f"{where} lacks tensor {name}: re-convert it with llama.cpp")
    return tuple(int(d) for d in reversed(tensors[name].shape))


def hf_config(
    gguf: Path,
    text: dict[str, Any],
    tt: Mapping,
    mmproj: Path,
    tower: dict[str, Any],
    mt: Mapping,
    family: str,
) -> dict[str, Any]:
    """The HF config.json of the pair (without the token ids), checked: the tower's output
    width is the decoder's, the tower's sizes match its tensors."""
    a = f"{TEXT_ARCH}."

    def key(name: str, default=None):
        v = text.get(a + name, default)
        if v is None:
            raise VeridraftError(f"{gguf} lacks {a + name}: re-convert it with llama.cpp")
        return v

    dim = int(key("embedding_length"))
    vocab = _shape(tt, "token_embd.weight", gguf)[0]
    sections = [int(s) for s in key("rope.dimension_sections")]
    if len(sections) < 3 or any(sections[3:]):
        raise VeridraftError(
            f"{gguf} has rope.dimension_sections {sections}: Qwen2-VL's are (t, h, w) and a 0"
        )
    heads = int(key("attention.head_count"))
    cfg: dict[str, Any] = {
        "architectures": [_CLASSES[family]],
        "model_type": family,
        "hidden_size": dim,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "rms_norm_eps": _decimal(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _decimal(key("rope.freq_base", 1e6)),
        "max_position_embeddings": int(key("context_length", 32768)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tt,
        "rope_scaling": {"type": "mrope", "mrope_section": sections[:3]},
        "use_sliding_window": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "vision_config": vision_config(mmproj, tower, mt, family),
    }
    out = cfg["vision_config"]["out_hidden_size" if family == "qwen2_5_vl" else "hidden_size"]
    if out != dim:
        raise VeridraftError(
            f"mmproj {mmproj} gives rows of {out} values and the decoder of {gguf} is {dim} "
            f"wide: they are not a pair; give the mmproj converted with this model ({MMPROJ_FLAG})"
        )
    return cfg


def _decimal(v: float) -> float:
    """A GGUF's float32 as the decimal the HF config held (1e-06, not 9.999999974752427e-07):
    the shortest that gives the same float32."""
    return float(str(np.float32(v)))


def vision_config(path: Path, meta: dict[str, Any], tensors: Mapping, family: str) -> dict:
    """The HF vision_config of an mmproj, its sizes read from the tensors (llama.cpp's
    feed_forward_length of a Qwen2-VL tower holds the decoder's width, not the MLP's)."""
    v = "clip.vision."
    hidden, channels, patch, _ = _shape(tensors, "v.patch_embd.weight", path)
    depth = int(meta.get(v + "block_count", 0))
    if depth < 1 or any(f"v.blk.{depth}.{p}.weight" in tensors for p in ("ln1", "attn_q")):
        raise VeridraftError(f"{path} has block_count {depth} but other blocks: re-convert it")
    heads = int(meta.get(v + "attention.head_count", 0))
    if heads < 1 or hidden % heads:
        raise VeridraftError(f"{path} has {heads} attention heads for width {hidden}: re-convert")
    mlp = _shape(tensors, "v.blk.0.ffn_up.weight", path)[0]
    merged = _shape(tensors, "mm.0.weight", path)[1]
    merge = int(meta.get(v + "spatial_merge_size", MERGE_SIZE))
    out = _shape(tensors, "mm.2.weight", path)[0]
    proj = int(meta.get(v + "projection_dim", out))
    checks = [
        (v + "embedding_length", int(meta.get(v + "embedding_length", hidden)), hidden),
        (v + "patch_size", int(meta.get(v + "patch_size", patch)), patch),
        (v + "projection_dim", proj, out),
        ("the merger's input width", merged, hidden * merge * merge),
    ]
    for what, got, want in checks:
        if got != want:
            raise VeridraftError(f"{path}: {what} is {got}, its tensors say {want}: re-convert it")
    _check_processor(path, meta, patch, merge)
    common = {
        "depth": depth,
        "num_heads": heads,
        "patch_size": patch,
        "temporal_patch_size": 2,
        "spatial_merge_size": merge,
        "in_chans": channels,
        "model_type": family,
    }
    if family == "qwen2_vl":
        if mlp % hidden:
            raise VeridraftError(f"{path}: MLP width {mlp} is not a multiple of {hidden}")
        return {
            **common,
            "embed_dim": hidden,
            "hidden_size": out,
            "mlp_ratio": mlp // hidden,
            "hidden_act": "quick_gelu",
        }
    # the blocks of full attention: every n-th (n_wa_pattern, what the converter writes for
    # Qwen2.5-VL), or listed (wa_layer_indexes, the key of the irregular patterns)
    n_wa = int(meta.get(v + "n_wa_pattern", 0))
    full = [int(b) for b in meta.get(v + "wa_layer_indexes", ())]
    if not full and n_wa < 1:
        raise VeridraftError(
            f"{path} lacks {v}n_wa_pattern (which blocks attend over the whole frame): "
            "re-convert the mmproj with llama.cpp"
        )
    full = full or [b for b in range(depth) if (b + 1) % n_wa == 0]
    return {
        **common,
        "hidden_size": hidden,
        "out_hidden_size": out,
        "intermediate_size": mlp,
        "hidden_act": "silu",
        "window_size": int(meta.get(v + "window_size", WINDOW_SIZE)),
        "fullatt_block_indexes": full,
        "tokens_per_second": TOKENS_PER_SECOND,
    }


def _check_processor(path: Path, meta: dict[str, Any], patch: int, merge: int) -> None:
    """veridraft's processor (vision/processor.py) makes Qwen's 14-px patches of CLIP-normalised
    pixels, two frames deep, merged 2x2: an mmproj that wants other inputs is refused."""
    from ..vision import processor as P

    v = "clip.vision."
    mean = meta.get(v + "image_mean", P.IMAGE_MEAN)
    std = meta.get(v + "image_std", P.IMAGE_STD)
    same = np.allclose(mean, P.IMAGE_MEAN, atol=1e-6) and np.allclose(std, P.IMAGE_STD, atol=1e-6)
    if patch != P.PATCH_SIZE or merge != P.MERGE_SIZE or not same:
        raise VeridraftError(
            f"{path} wants {patch}-px patches merged {merge}x{merge}, mean {mean}, std {std}; "
            f"veridraft's Qwen2-VL processor makes {P.PATCH_SIZE}-px patches merged "
            f"{P.MERGE_SIZE}x{P.MERGE_SIZE} with CLIP's mean and std: not a Qwen2-VL mmproj"
        )


# ---------------------------------------------------------------------------------------------
# the tower's tensors, under the HF checkpoint's names

_BLOCK = {"ln1": "norm1", "ln2": "norm2", "attn_out": "attn.proj"}
_MLP = {
    "qwen2_vl": {"ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"},
    "qwen2_5_vl": {
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
}
_TOP = {"v.post_ln": "merger.ln_q", "mm.0": "merger.mlp.0", "mm.2": "merger.mlp.2"}
_QKV = ("attn_q", "attn_k", "attn_v")


def dequantize(t: convert.GGUFTensor) -> np.ndarray:
    """A GGUF tensor as float32, in torch's dimension order (gguf's own de-quantization)."""
    from gguf import GGMLQuantizationType
    from gguf import dequantize as gguf_dequantize

    shape = tuple(int(d) for d in reversed(t.shape))
    if t.kind == "F32":
        w = t.data.view(np.float32)
    else:
        w = gguf_dequantize(t.data.reshape(*shape[:-1], -1), GGMLQuantizationType[t.kind])
    return np.array(w, dtype=np.float32, copy=True).reshape(shape)


def tower_tensors(path: str | os.PathLike, family: str | None = None) -> dict[str, torch.Tensor]:
    """The tower of an mmproj as float32 tensors under the HF checkpoint's `visual.*` names:
    q/k/v fused back into qkv, the two patch-embedding slices stacked back into the Conv3d's
    temporal axis. A tensor a Qwen2-VL / Qwen2.5-VL tower has not is an error."""
    path = Path(path)
    fix = "re-download or re-convert the mmproj"
    tensors = convert.read_gguf(path, fix=fix).tensors
    got = check_mmproj(path, read_metadata(path), tensors)
    if family is not None and got != family:
        raise VeridraftError(
            f"mmproj {path} is a {got} tower and the model is {family}: give the model's own "
            f"mmproj ({MMPROJ_FLAG})"
        )
    mlp = _MLP[got]
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, t in tensors.items():
        stem, _, suffix = name.rpartition(".")
        if name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):
            continue
        parts = stem.split(".")
        if stem in _TOP:
            out[f"visual.{_TOP[stem]}.{suffix}"] = torch.from_numpy(dequantize(t))
        elif len(parts) == 4 and parts[:2] == ["v", "blk"] and parts[3] in _QKV:
            qkv.setdefault((parts[2], suffix), {})[parts[3]] = dequantize(t)
        elif len(parts) == 4 and parts[:2] == ["v", "blk"] and parts[3] in {**_BLOCK, **mlp}:
            hf = {**_BLOCK, **mlp}[parts[3]]
            out[f"visual.blocks.{parts[2]}.{hf}.{suffix}"] = torch.from_numpy(dequantize(t))
        else:
            raise VeridraftError(
                f"{path} holds tensor {name}, which a {got} tower has not: not a Qwen2-VL / "
                "Qwen2.5-VL mmproj of llama.cpp's converter"
            )
    for (b, suffix), pieces in qkv.items():
        if set(pieces) != set(_QKV):
            raise VeridraftError(f"{path} lacks one of v.blk.{b}.attn_q/k/v.{suffix}: re-convert")
        fused = np.concatenate([pieces[k] for k in _QKV])
        out[f"visual.blocks.{b}.attn.qkv.{suffix}"] = torch.from_numpy(fused)
    # llama.cpp splits the Conv3d [out, in, 2, p, p] into its two temporal slices
    slices = [dequantize(tensors[n]) for n in ("v.patch_embd.weight", "v.patch_embd.weight.1")]
    out["visual.patch_embed.proj.weight"] = torch.from_numpy(np.stack(slices, axis=2))
    return out


# ---------------------------------------------------------------------------------------------
# the decoder's state dict plus the tower


def mmproj_source(folder: str | os.PathLike) -> Path:
    """The mmproj a pair's folder was made from (veridraft.json records it); a one-line error
    naming the fix when it is gone, or when the folder is not a pair's."""
    folder = Path(folder)
    try:
        p = json.loads((folder / catalog.MARKER).read_text()).get("mmproj_path")
    except (OSError, ValueError):
        p = None
    if p and Path(p).is_file():
        return Path(p)
    if p:
        raise VeridraftError(
            f"the mmproj of {folder} ({p}) is gone: load the GGUF again with {MMPROJ_FLAG}"
        )
    raise VeridraftError(
        f"{folder} is a Qwen2-VL / Qwen2.5-VL model made from a GGUF without its mmproj: load "
        f"the .gguf again with {MMPROJ_FLAG}"
    )


def is_pair_folder(folder: str | os.PathLike) -> bool:
    try:
        return bool(json.loads((Path(folder) / catalog.MARKER).read_text()).get("mmproj_path"))
    except (OSError, ValueError):
        return False


class WithTower(Mapping):
    """A decoder's HF-named tensors (a GGUF's, de-quantized when asked for) plus the tower's
    `visual.*` tensors from the mmproj. (Not named `sd`: Qwen2VL.load_hf looks through a
    wrapper's `sd` for the tower.)"""

    def __init__(self, text: Mapping, tower: dict[str, torch.Tensor]) -> None:
        self.text, self.tower = text, tower

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tower[key] if key in self.tower else self.text[key]

    def __iter__(self):
        yield from self.text
        yield from self.tower

    def __len__(self) -> int:
        return len(self.text) + len(self.tower)

    def __contains__(self, key: object) -> bool:
        return key in self.tower or key in self.text

    def meta(self, key: str) -> torch.Tensor:
        if key in self.tower:
            return torch.empty(self.tower[key].shape, dtype=torch.float32, device="meta")
        return self.text.meta(key)


def with_tower(text: Mapping, folder: str | os.PathLike, family: str) -> WithTower:
    """`text` (the decoder's tensors) plus the tower of the folder's mmproj."""
    return WithTower(text, tower_tensors(mmproj_source(folder), family))
