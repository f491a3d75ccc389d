"""GGUF file -> HF-style folder (float32 safetensors, tokenizer.json, configs).

transformers reads GGUF checkpoints (de-quantizing every tensor to float32) and their tokenizers;
we save both in the ordinary HF layout so that every later load is a fast safetensors read and a
`tokenizers` file load, with no transformers import. The GGUF is checked up front with
`gguf.GGUFReader`, so a truncated or corrupt file fails with one clear message instead of a deep
traceback.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from ..errors import VeridraftError

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _invalid(path: Path, why: str = "") -> VeridraftError:
    detail = f" ({why})" if why else ""
    return VeridraftError(
        f"{path} is not a valid GGUF file (truncated or corrupt){detail}: re-download it"
    )


def check_gguf(path: str | os.PathLike) -> dict:
    """Parse the GGUF header and tensor table; return a small summary or raise VeridraftError.

    Catches bad magic, truncated headers and tensor data that would run past the end of the file.
    """
    path = Path(path)
    if not path.is_file():
        raise VeridraftError(f"{path} does not exist: give the path to a GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise _invalid(path, "no GGUF magic")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        size = path.stat().st_size
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
        if end > size or not reader.tensors:
            raise ValueError(f"tensor data needs {end} bytes, the file has {size}")
        arch_field = reader.fields.get("general.architecture")
        arch = (
            bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8", "replace")
            if arch_field is not None
            else "?"
        )
        return {"architecture": arch, "tensors": len(reader.tensors), "bytes": size}
    except VeridraftError:
        raise
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors, numpy errors...
        raise _invalid(path, f"{type(e).__name__}: {e}".strip()[:160]) from e


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("transformers", "torch", "gguf", "tokenizers", "safetensors"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:
            out[mod] = "?"
    return out


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
    """Convert a GGUF file into an HF folder at out_dir (created if needed); return out_dir.

    Writes config.json (without quantization_config), generation_config.json, model.safetensors
    (float32), tokenizer.json, tokenizer_config.json, chat_template.jinja when the GGUF has a chat
    template, and veridraft.json last (its presence marks a finished folder). `copy_source` also
    copies the GGUF in as source.gguf (pull() writes it there itself); `source_name` is the
    original file name recorded in veridraft.json (default: the GGUF's own name).
    """
    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    summary = check_gguf(gguf_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    if source_sha256 is None:
        source_sha256 = sha256_file(gguf_path)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

    old_verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        folder, fname = str(gguf_path.parent), gguf_path.name
        print("veridraft:       reading the tokenizer from the GGUF", file=sys.stderr, flush=True)
        try:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            print(
                "veridraft:       de-quantizing the weights to float32", file=sys.stderr, flush=True
            )
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype="float32")
        except (ValueError, KeyError, NotImplementedError) as e:
            raise VeridraftError(
                f"transformers {transformers.__version__} cannot convert {gguf_path} "
                f"(architecture {summary['architecture']}: {str(e).splitlines()[0][:160]}); "
                "use a GGUF of a supported architecture or an HF folder"
            ) from e
        # The weights are plain float32 tensors now; transformers still marks the model as
        # GGUF-quantized, which blocks save_pretrained. Drop the marks.
        model.hf_quantizer = None
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None and hasattr(cfg, "quantization_config"):
                delattr(cfg, "quantization_config")
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
    finally:
        transformers.logging.set_verbosity(old_verbosity)

    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    missing = [f for f in REQUIRED_FILES if not (out_dir / f).is_file()]
    if missing:
        raise VeridraftError(
            f"converting {gguf_path} produced no {', '.join(missing)}; "
            f"transformers {transformers.__version__} may not support this GGUF fully"
        )
    if copy_source:
        shutil.copyfile(gguf_path, out_dir / "source.gguf")

    meta = {
        "name": name or out_dir.name,
        "source_file": source_name or gguf_path.name,
        "source_sha256": source_sha256,
        "source_bytes": summary["bytes"],
        "source_architecture": summary["architecture"],
        "packages": list(packages),
        "converted_with": _versions(),
        "dtype": "float32",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    (out_dir / "veridraft.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir
