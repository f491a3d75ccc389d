"""Native PyTorch decoders loaded from HF folders (config.json + safetensors).

model = from_folder(path)                 # precision="fp32"
cache = model.new_cache(max_len)
logits = model(tokens, cache, skip=None, view=None, capture=None, num_logits=None)
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

__all__ = [
    "Capture",
    "ModelConfig",
    "Skip",
    "Transformer",
    "from_folder",
    "from_hf_config_and_state_dict",
]

_ARCHS: dict[str, type[Transformer]] = {"llama": Llama, "gemma3": Gemma3}


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
    """A _LazyStateDict whose linear weights are meta tensors. The packed modes read each one
    when they pack it, q4 reads the GGUF's blocks and checks them against a few rows of each: so
    loading never holds the float32 model (7 GB for the 1.5B model)."""

    def __init__(self, sd: _LazyStateDict) -> None:
        self.sd = sd

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.sd.meta(key) if _LINEAR_WEIGHTS.search(key) else self.sd[key]

    def __contains__(self, key: object) -> bool:
        return key in self.sd

    def __iter__(self):
        return iter(self.sd)

    def __len__(self) -> int:
        return len(self.sd)


def from_folder(path: str | Path, precision: str = "fp32") -> Transformer:
    """Load an HF model folder: config.json + model.safetensors (or shards with an index)."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise VeridraftError(f"{folder} is not a model folder (no config.json)")
    if precision not in ALL_PRECISIONS:
        raise VeridraftError(
            f"unknown precision {precision!r}; supported: {', '.join(ALL_PRECISIONS)}"
        )
    gguf = None
    if precision in GGUF_PRECISIONS:  # fail before reading the weights without the GGUF
        from .q4 import gguf_source

        gguf = gguf_source(folder)
    cfg = ModelConfig.from_hf(read_json(folder / "config.json"))
    gen = folder / "generation_config.json"
    if gen.is_file():  # generate() stops on these too (e.g. chat end-of-turn tokens)
        eos = read_json(gen).get("eos_token_id")
        for e in eos if isinstance(eos, list) else [] if eos is None else [eos]:
            if int(e) not in cfg.eos_token_ids:
                cfg.eos_token_ids.append(int(e))
    files = _weight_files(folder)
    sd = _LazyStateDict(files)
    source = str(files[0]) if len(files) == 1 else f"the shards in {folder}"
    if gguf is None and precision == "fp32":
        return from_hf_config_and_state_dict(cfg, sd, precision, source)
    if gguf is None:  # a packed mode: one float32 matrix at a time, packed as it is read
        model = from_hf_config_and_state_dict(cfg, _WithoutLinears(sd), "fp32", source)
        model = apply_precision(model, precision, reference=sd)
        _return_freed_memory()
        return model
    from .q4 import apply_q4

    model = from_hf_config_and_state_dict(cfg, _WithoutLinears(sd), "fp32", source)
    model = apply_q4(model, gguf, reference=sd, a8=precision == "q4a8")
    _return_freed_memory()
    return model
