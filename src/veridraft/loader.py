"""`load(name_or_path)`: catalog name, GGUF file, HF folder or hub id -> LoadedModel.

model = veridraft.load("smollm2-135m")      # pulled on first use
model = veridraft.load("path/to/model.gguf") # its config and tokenizer read out once
model = veridraft.load("path/to/hf-folder")  # config.json + safetensors + tokenizer.json

A GGUF is run as it is in the q4 modes; the float modes make a float32 copy of it once, on first
use (models/catalog.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .auto import AUTO, pick_precision
from .errors import VeridraftError
from .models import catalog
from .tokenizer import Tokenizer

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    name: str
    path: Path
    net: nn.Module
    tokenizer: Tokenizer
    precision: str
    # what precision="auto" chose and why (one line), or "" when the caller named the mode
    chosen: str = ""

    @property
    def config(self):
        return self.net.config

    @property
    def context_length(self) -> int:
        return int(self.net.config.max_position_embeddings)

    @property
    def gguf_path(self) -> Path | None:
        """The GGUF this model was made from, when it is still on disk (for llama.cpp)."""
        src = self.path / catalog.SOURCE_GGUF
        if src.is_file():
            return src
        try:
            meta = json.loads((self.path / catalog.MARKER).read_text())
        except (OSError, ValueError):
            return None
        p = meta.get("source_path")
        return Path(p) if p and Path(p).is_file() else None

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        return (
            f"LoadedModel({self.name!r}, {n / 1e6:.0f}M params, {self.precision}, "
            f"context {self.context_length}, vocab {self.tokenizer.vocab_size}, "
            f"chat_template={self.tokenizer.has_chat_template}, path={str(self.path)!r})"
        )


def has_gguf(folder: str | Path) -> bool:
    """True when the 4-bit modes can run from `folder` (its GGUF is on disk)."""
    from .models.q4 import gguf_source

    try:
        gguf_source(folder)
    except VeridraftError:
        return False
    return True


def build_kernels(precision: str | None = None) -> list[str]:
    """Compile, once per machine, the kernels a mode runs (all of them for None), so that the
    compiler runs while a model loads and never inside a generation's timings. Returns the
    names of those this CPU has (a kernel that cannot build warns once and torch's runs)."""
    from .models import attnkernel, fused, q4kernel

    built = []
    if attnkernel.load() is not None:  # every mode's decode attention
        built.append("attention")
    if precision in (None, "q4", "q4a8"):
        if q4kernel.load() is not None:
            built.append("q4")
        if fused.load() is not None:
            built.append("fused q4 forward")
    return built


def load_folder(folder: str | Path, precision: str = AUTO, name: str | None = None):
    """Load a model folder: a pulled or GGUF one, or an HF folder (config.json, safetensors,
    tokenizer.json). precision="auto": the fastest mode for this model on this CPU
    (`veridraft.auto`)."""
    from . import models

    folder = Path(folder).expanduser()
    chosen = ""
    if precision == AUTO:
        choice = pick_precision(folder, name or folder.name, has_gguf(folder))
        precision, chosen = choice.value, choice.note("precision")
    tokenizer = Tokenizer.from_folder(folder)
    net = models.from_folder(folder, precision=precision)
    build_kernels(precision)
    cfg = getattr(net, "config", None)
    for e in getattr(cfg, "eos_token_ids", None) or ():
        tokenizer.eos_ids.add(int(e))
    return LoadedModel(
        name=name or folder.name,
        path=folder,
        net=net,
        tokenizer=tokenizer,
        precision=precision,
        chosen=chosen,
    )


def gguf_folder(gguf: str | Path, mmproj: str | Path | None = None) -> Path:
    """The folder of a GGUF file: its config and tokenizer, read out once into
    $VERIDRAFT_HOME/models/gguf-<sha256[:16]>/ (a few MB; the GGUF stays where it is and
    veridraft.json records its path); return it. A Qwen2-VL / Qwen2.5-VL GGUF also needs its
    vision tower, the `mmproj` GGUF (default: the one beside it; models/mmproj.py)."""
    from .models import convert
    from .models import mmproj as vl

    gguf = Path(gguf).expanduser().resolve()
    if mmproj is not None or vl.architecture(gguf) in (vl.TEXT_ARCH, vl.CLIP_ARCH):
        return vl.pair_folder(gguf, mmproj)
    sha = convert.sha256_file(gguf)
    final = catalog.models_dir() / f"gguf-{sha[:16]}"
    if catalog.is_complete(final):
        catalog.record_paths(final, source_path=gguf)  # the same bytes may have moved since
        return final
    catalog.log(f"reading the config and tokenizer of {gguf} into {final} (once)")
    with catalog.staging_dir(final) as tmp:
        convert.write_metadata(gguf, tmp, name=gguf.stem, source_sha256=sha)
        catalog.record_paths(tmp, source_path=gguf)
    return final


def _hub_folder(repo_id: str) -> Path:
    known = ", ".join(catalog.CATALOG)
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer.model"],
        )
    except Exception as e:
        raise VeridraftError(
            f"cannot fetch '{repo_id}' from the Hugging Face hub ({type(e).__name__}): the hub "
            f"is unreachable from here or the id is wrong; use a catalog model ({known}), "
            "a GGUF file or an HF folder"
        ) from e
    return Path(path)


def load(
    name_or_path: str | Path, precision: str = AUTO, mmproj: str | Path | None = None
) -> LoadedModel:
    """Load a model by catalog name, GGUF file path, HF folder path or hub id.

    precision: "auto" (the fastest mode this CPU runs for the model: `veridraft.auto`), or
    "fp32" (the reference: the original weights), "fp16w", "bf16", "q4", "q4a8".
    mmproj: the vision tower GGUF of a Qwen2-VL / Qwen2.5-VL GGUF, as llama.cpp's converter
    writes the pair (default: the mmproj beside the GGUF). A folder of llama.cpp files without
    config.json (the GGUF and its mmproj-*.gguf) loads that pair."""
    spec = str(name_or_path)
    path = Path(spec).expanduser()
    is_gguf = path.is_file() and (path.suffix.lower() == ".gguf" or _looks_like_gguf(path))
    if mmproj is not None and not is_gguf and not path.is_dir():
        raise VeridraftError(
            f"mmproj is the vision tower of a Qwen2-VL / Qwen2.5-VL GGUF and {spec} is not a "
            "GGUF file: give the language model's .gguf, or load without mmproj"
        )
    if isinstance(name_or_path, str) and spec in catalog.CATALOG:
        folder = catalog.pull(spec)  # returns at once when already pulled
        return load_folder(folder, precision, name=spec)

    if path.exists():
        if is_gguf:
            return load_folder(gguf_folder(path, mmproj), precision, name=path.stem)
        if path.is_dir() and (path / "config.json").is_file():
            if mmproj is not None:
                raise VeridraftError(
                    f"{path} is an HF folder (its tower is in its safetensors): load it "
                    "without mmproj"
                )
            return load_folder(path, precision)
        if path.is_dir():
            from .models.mmproj import find_pair

            pair = find_pair(path)  # llama.cpp's files: the GGUF and its mmproj-*.gguf
            if pair is not None:
                gguf, found = pair
                folder = gguf_folder(gguf, mmproj or found)
                return load_folder(folder, precision, name=gguf.stem)
        raise VeridraftError(
            f"{path} is not a model: expected a GGUF file or a folder with config.json"
        )
    if spec.lower().endswith(".gguf") or spec.startswith((".", "/", "~")):
        raise VeridraftError(f"{spec} does not exist: give the path to a GGUF file or HF folder")
    if isinstance(name_or_path, str) and _HUB_ID.match(spec):
        return load_folder(_hub_folder(spec), precision, name=spec)
    raise VeridraftError(
        f"unknown model '{spec}'; known: {', '.join(catalog.CATALOG)} "
        "(or give a path to a GGUF file or an HF folder)"
    )


def _looks_like_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def list_models() -> list[dict]:
    """Rows for `veridraft models`: name, description, size, pulled, path, ... (see catalog)."""
    return catalog.list_models()
