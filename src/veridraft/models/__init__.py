"""Native PyTorch decoders loaded from model folders: config.json plus float32 safetensors (an
HF folder), or a GGUF (a pulled catalog model, a user's GGUF file's folder).

model = from_folder(path)                 # precision="fp32"
cache = model.new_cache(max_len)
logits = model(tokens, cache, skip=None, view=None, capture=None, num_logits=None)

The q4 modes read everything from the GGUF: its quantized blocks for the linears, the other
tensors (embeddings, norms, biases) de-quantized on load. The float modes read float32
safetensors: the folder's own, or a copy made from its GGUF once, when such a mode is first asked
for (catalog.float32_copy). A Qwen2-VL / Qwen2.5-VL made from llama.cpp's GGUF + mmproj pair
(models/mmproj.py) makes no copy: the float modes de-quantize its decoder as they read it, and
every mode reads its vision tower from the mmproj.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import VeridraftError
from .base import PRECISIONS, Capture, ModelConfig, Skip, Transformer, read_json
from .gemma3 import Gemma3
from .llama import Llama
from .precision import ALL_PRECISIONS, GGUF_PRECISIONS, apply_precision
from .qwen2_vl import Qwen2VL

__all__ = [
    "Capture",
    "ModelConfig",
    "Skip",
    "Transformer",
    "from_folder",
    "from_hf_config_and_state_dict",
]

_ARCHS: dict[str, type[Transformer]] = {"llama": Llama, "gemma3": Gemma3, "qwen2_vl": Qwen2VL}


def from_hf_config_and_state_dict(
    config: dict[str, Any] | ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    precision: str = "fp32",
    source: str = "the state dict",
) -> Transformer:
    """Build a native model from an HF config (dict or ModelConfig) and HF-named tensors."""
    if precision in GGUF_PRECISIONS:
        raise VeridraftError(
            f"precision {precision!r} is built from the model's GGUF: load the folder or the "
            ".gguf file"
        )
    if precision not in PRECISIONS:
        raise VeridraftError(f"unknown precision {precision!r}; supported: {', '.join(PRECISIONS)}")
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_hf(config)
    with torch.device("meta"):  # no random init: every weight is assigned from the checkpoint
        model = _ARCHS[cfg.arch](cfg, precision)
    model.load_hf(state_dict, source)
    model = apply_precision(model, precision)
    if precision != "fp32":
        _return_freed_memory()
    return model


def _return_freed_memory() -> None:
    """Hand the heap pages freed by packing back to the OS (glibc keeps freed small blocks,
    here hundreds of MB of float32 weights, in the process until told otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise VeridraftError(
                f"{folder / missing[0]} is missing (listed in {index.name}); re-pull the model"
            )
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise VeridraftError(f"no *.safetensors in {folder}; re-pull or re-convert the model")
    return files


def _unreadable(file: Path, e: Exception) -> VeridraftError:
    msg = " ".join(str(e).split())
    return VeridraftError(
        f"cannot read {file} ({msg}); the file is truncated or corrupt: re-pull or re-convert the model"
    )


class _LazyStateDict(Mapping):
    """The tensors of safetensors files, each read into memory of its own when asked for.

    `load_file` maps the whole file, and one small tensor kept as it is (a norm weight) keeps
    every page of the mapping resident: a packed model would carry its float32 file along. Here
    each tensor is copied out of a short-lived mapping, so a tensor that the model packs (or
    fuses) is freed once it is used, and a 16-bit model never holds the float32 weights.
    """

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(f, framework="pt") as h:
                    self._where.update(dict.fromkeys(h.keys(), f))
            except Exception as e:  # safetensors raises several types for corrupt headers
                raise _unreadable(f, e) from e
        self._last: tuple[str, torch.Tensor] | None = None  # callers often look twice

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        file = self._where[key]
        try:
            with safe_open(file, framework="pt") as h:
                t = h.get_tensor(key).clone()
        except Exception as e:
            raise _unreadable(file, e) from e
        self._last = (key, t)
        return t

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def meta(self, key: str) -> torch.Tensor:
        """A float32 tensor of `key`'s shape on the meta device (no data read)."""
        file = self._where[key]
        try:
            with safe_open(file, framework="pt") as h:
                shape = h.get_slice(key).get_shape()
        except Exception as e:
            raise _unreadable(file, e) from e
        return torch.empty(shape, dtype=torch.float32, device="meta")

    def rows(self, key: str, index) -> torch.Tensor:
        """Rows `index` of the 2-D tensor `key`, float32 (only those rows are read)."""
        file = self._where[key]
        try:
            with safe_open(file, framework="pt") as h:
                sl = h.get_slice(key)
                out = [sl[int(i) : int(i) + 1] for i in index]
        except Exception as e:
            raise _unreadable(file, e) from e
        return torch.cat(out).float()


# The HF names of the linear weights: the packed modes and q4 replace them, so a model for those
# is built without them (meta tensors) and reads them one at a time.
_LINEAR_WEIGHTS = re.compile(r"(\.(q|k|v|o|gate|up|down)_proj\.weight|^lm_head\.weight)$")


class _WithoutLinears(Mapping):
    """A state dict whose linear weights are meta tensors. The packed modes read each one when
    they pack it, q4 reads the GGUF's blocks instead: so loading never holds the float32 model
    (7 GB for the 1.5B model)."""

    def __init__(self, sd: _LazyStateDict | _GGUFStateDict) -> None:
        self.sd = sd

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.sd.meta(key) if _LINEAR_WEIGHTS.search(key) else self.sd[key]

    def __contains__(self, key: object) -> bool:
        return key in self.sd

    def __iter__(self):
        return iter(self.sd)

    def __len__(self) -> int:
        return len(self.sd)


# GGUF tensor names -> HF names, as transformers' GGUF reader maps them for the architectures
# veridraft runs (the float32 folders it converts use these names too)
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_LAYER_GEMMA = {
    **_GGUF_LAYER,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _hf_name(gguf_name: str, arch: str) -> str | None:
    """ "blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"; None for a tensor
    the model does not use (e.g. llama 3's rope_freqs)."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{suffix}"
    parts = stem.split(".")
    table = _GGUF_LAYER_GEMMA if arch == "gemma3" else _GGUF_LAYER
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in table:
        return f"model.layers.{parts[1]}.{table[parts[2]]}.{suffix}"
    return None


class _GGUFStateDict(Mapping):
    """The tensors of a GGUF under their HF names, each de-quantized to float32 when asked for:
    the values transformers' GGUF reader gives (gguf's own de-quantization, then llama's q/k
    rows back in HF order and Gemma's norms less 1), which is what a float32 folder converted
    from the same GGUF holds, bit for bit (tests/models/test_q4_gguf.py)."""

    def __init__(self, path: Path, cfg: ModelConfig, fix: str = "") -> None:
        from .convert import read_gguf

        self.file = read_gguf(path, fix=fix)
        self.heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}
        self._gguf: dict[str, str] = {}
        for name in self.file.tensors:
            hf = _hf_name(name, cfg.arch)
            if hf is not None:
                self._gguf[hf] = name
        self._last: tuple[str, torch.Tensor] | None = None  # callers often look twice

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        import numpy as np
        from gguf import GGMLQuantizationType, dequantize

        from .q4 import BLOCKS, row_order
        from .q4 import dequantize as dequantize_blocks

        name = self._gguf[key]
        t = self.file.tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order: the row length last
        if t.kind in BLOCKS and len(shape) == 2:  # the same values, faster (an embedding table)
            w, fresh = dequantize_blocks(t.kind, t.data, shape[0], shape[1]).numpy(), True
        else:  # F32 comes back as a view into the mapped file: copied below
            w = dequantize(t.data.reshape(*shape[:-1], -1), GGMLQuantizationType[t.kind])
            fresh = False
        arch = self.file.architecture
        if arch == "llama" and name.split(".")[-2] in self.heads:
            w, fresh = w[row_order(arch, name, shape[0], self.heads)], True
        if arch in ("gemma2", "gemma3") and "norm.weight" in name:
            w, fresh = w - 1, True  # llama.cpp stores Gemma's norms as 1 + w
        if not fresh or w.dtype != np.float32:
            w = np.array(w, dtype=np.float32, copy=True)
        out = torch.from_numpy(w.reshape(shape))
        self._last = (key, out)
        return out

    def __iter__(self):
        return iter(self._gguf)

    def __len__(self) -> int:
        return len(self._gguf)

    def __contains__(self, key: object) -> bool:
        return key in self._gguf

    def meta(self, key: str) -> torch.Tensor:
        """A float32 tensor of `key`'s shape on the meta device (no data read)."""
        shape = tuple(int(d) for d in reversed(self.file.tensors[self._gguf[key]].shape))
        return torch.empty(shape, dtype=torch.float32, device="meta")


def _config(folder: Path) -> ModelConfig:
    cfg = ModelConfig.from_hf(read_json(folder / "config.json"))
    gen = folder / "generation_config.json"
    if gen.is_file():  # generate() stops on these too (e.g. chat end-of-turn tokens)
        eos = read_json(gen).get("eos_token_id")
        for e in eos if isinstance(eos, list) else [] if eos is None else [eos]:
            if int(e) not in cfg.eos_token_ids:
                cfg.eos_token_ids.append(int(e))
    return cfg


_GGUF_MARKS = ("source.gguf", "veridraft.json")  # a folder made from a GGUF has one of them


def _has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors.index.json").is_file() or any(folder.glob("*.safetensors"))


def from_folder(path: str | Path, precision: str = "fp32") -> Transformer:
    """Load a model folder: config.json plus model.safetensors (or shards with an index), or
    plus a GGUF (source.gguf or the file veridraft.json names).

    q4 / q4a8 read the GGUF alone. A float mode on a folder without safetensors makes the
    float32 copy from the GGUF once (catalog.float32_copy) and reads that."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise VeridraftError(f"{folder} is not a model folder (no config.json)")
    if precision not in ALL_PRECISIONS:
        raise VeridraftError(
            f"unknown precision {precision!r}; supported: {', '.join(ALL_PRECISIONS)}"
        )
    if precision in GGUF_PRECISIONS:
        from .q4 import gguf_source

        _multimodal_needs_pair(folder, precision)
        gguf = gguf_source(folder)  # fails before anything is read when there is none
        return _from_gguf(folder, gguf, _config(folder), precision)
    cfg = _config(folder)
    weights = folder
    if not _has_weights(folder) and any((folder / f).is_file() for f in _GGUF_MARKS):
        from .catalog import float32_copy
        from .mmproj import is_pair_folder

        if is_pair_folder(folder):  # a GGUF + mmproj pair: de-quantized as it is read
            from .q4 import gguf_source

            why = f"precision {precision!r} de-quantizes the model's GGUF"
            return _from_gguf(folder, gguf_source(folder, why), cfg, precision)

        weights = float32_copy(folder, precision)
    files = _weight_files(weights)
    sd = _LazyStateDict(files)
    source = str(files[0]) if len(files) == 1 else f"the shards in {weights}"
    if precision == "fp32":
        return from_hf_config_and_state_dict(cfg, sd, precision, source)
    # a packed mode: one float32 matrix at a time, packed as it is read
    model = from_hf_config_and_state_dict(cfg, _WithoutLinears(sd), "fp32", source)
    model = apply_precision(model, precision, reference=sd)
    _return_freed_memory()
    return model


def _multimodal_needs_pair(folder: Path, precision: str) -> None:
    """The q4 modes run a vision-language model from its GGUF + mmproj pair: an HF folder of
    one has no GGUF, and a folder made from the GGUF alone has no tower. Say so before looking
    for a GGUF."""
    from .config import MULTIMODAL_MODEL_TYPES
    from .mmproj import MMPROJ_FLAG, is_pair_folder

    model_type = read_json(folder / "config.json").get("model_type")
    if model_type in MULTIMODAL_MODEL_TYPES and not is_pair_folder(folder):
        raise VeridraftError(
            f"precision {precision!r} runs a {model_type} model from its GGUF and mmproj "
            f"(llama.cpp's pair) and {folder} is an HF folder only; use precision fp32, bf16 "
            f"or fp16w, or load the .gguf with {MMPROJ_FLAG}"
        )


def _from_gguf(folder: Path, gguf: Path, cfg: ModelConfig, precision: str) -> Transformer:
    """A model from the GGUF alone: q4 / q4a8 its blocks for the linears, the rest
    de-quantized; a float mode (a vision-language pair's) every tensor de-quantized as it is
    read. A vision-language model's tower comes from the mmproj the folder records."""
    from .convert import repair_hint
    from .q4 import apply_q4

    fix = repair_hint(folder)
    sd = _GGUFStateDict(gguf, cfg, fix)
    if cfg.arch == "qwen2_vl":
        from .mmproj import with_tower

        sd = with_tower(sd, folder, cfg.model_type)
    packed = precision != "fp32"  # built with meta linears, each read when it is packed
    try:
        model = from_hf_config_and_state_dict(
            cfg, _WithoutLinears(sd) if packed else sd, "fp32", str(gguf)
        )
    except RuntimeError as e:  # load_state_dict: a tensor's shape is not config.json's
        why = " ".join(str(e).split())[:200]
        raise VeridraftError(f"{gguf} does not fit {folder / 'config.json'} ({why}): {fix}") from e
    if precision in GGUF_PRECISIONS:
        model = apply_q4(model, gguf, reference=sd, a8=precision == "q4a8", fix=fix)
    elif packed:
        model = apply_precision(model, precision, reference=sd)
    if packed:
        _return_freed_memory()
    return model
