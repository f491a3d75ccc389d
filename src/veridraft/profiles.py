"""Tuned drafter profiles: the file format, validation, save/load and lookup.

A profile is one JSON file written by `veridraft tune layerskip` (see docs/tuning.md): the skip
sets and draft-exit settings found for one model in one precision on one machine, with the
figures the search measured and the command that made it. `draft="layerskip"` loads the profile
matching the model by default.

File name: ``layerskip.<model name>.<precision>.json``. Lookup order for a model and precision:

1. ``$VERIDRAFT_HOME/profiles/`` (default ``~/.cache/veridraft/profiles/``), same precision;
2. the profiles shipped in the package (``veridraft/profiles/``), same precision;
3. 1 then 2 again for a profile of the same model tuned in another precision (the drafter's
   note says so).

A profile that exists but does not parse or validate, or that was made for other weights
(different layer count or source sha256), raises VeridraftError naming the file: a broken
profile is never skipped silently.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import VeridraftError
from .models.base import Skip

FORMAT = "veridraft-profile/1"
METHOD = "layerskip"
SHIPPED_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass
class Profile:
    model: str  # the model's name (catalog name, or folder / GGUF stem)
    n_layers: int
    precision: str
    skip: Skip
    gamma: float  # initial draft-exit threshold for the drafter (the search's final gamma)
    num_tokens: int  # maximum draft steps K
    source_sha256: str | None = None  # sha256 of the weights file the model was converted from
    architecture: str | None = None
    figures: dict = field(default_factory=dict)  # objective figures measured by the search
    search: dict = field(default_factory=dict)  # settings and history summary of the search
    machine: dict = field(default_factory=dict)  # cpu, cpu_count, threads, torch version
    date: str = ""
    command: str = ""
    method: str = METHOD
    path: Path | None = None  # where it was loaded from (not stored)

    def drafter_params(self) -> dict:
        """Keyword parameters for LayerSkipDrafter (besides the skip set)."""
        return {"gamma": self.gamma, "num_tokens": self.num_tokens}

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "method": self.method,
            "model": {
                "name": self.model,
                "n_layers": self.n_layers,
                "source_sha256": self.source_sha256,
                "architecture": self.architecture,
            },
            "precision": self.precision,
            "skip": {"attn": sorted(self.skip.attn), "mlp": sorted(self.skip.mlp)},
            "drafter": {"gamma": self.gamma, "num_tokens": self.num_tokens},
            "figures": self.figures,
            "search": self.search,
            "machine": self.machine,
            "date": self.date,
            "command": self.command,
        }

    def describe(self) -> str:
        where = f" ({self.path})" if self.path else ""
        sp = self.figures.get("speedup")
        fig = f", measured {sp:.2f}x over ar" if isinstance(sp, int | float) else ""
        if isinstance(sp, int | float) and sp < 1.0:
            fig += " (slower than plain decoding where it was tuned: prefer draft=None)"
        return (
            f"layerskip profile for {self.model} [{self.precision}]{where}: "
            f"{len(self.skip.attn)} attn + {len(self.skip.mlp)} mlp sub-layers skipped, "
            f"gamma {self.gamma:.3f}, K {self.num_tokens}{fig}"
        )


def profiles_home() -> Path:
    from .models.catalog import home

    return home() / "profiles"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "model"


def file_name(model: str, precision: str, method: str = METHOD) -> str:
    return f"{method}.{safe_name(model)}.{safe_name(precision)}.json"


# -------------------------------------------------------------------------------- validation


def _bad(where, what: str) -> VeridraftError:
    return VeridraftError(
        f"invalid layerskip profile {where}: {what} (re-run `veridraft tune layerskip` or delete "
        "the file)"
    )


def _layers(where, name: str, value, n_layers: int) -> frozenset[int]:
    if not isinstance(value, list) or any(
        isinstance(i, bool) or not isinstance(i, int) for i in value
    ):
        raise _bad(where, f"skip.{name} must be a list of layer indices, got {value!r:.80}")
    bad = [i for i in value if not 0 <= i < n_layers]
    if bad:
        raise _bad(where, f"skip.{name} names layers {bad} outside 0..{n_layers - 1}")
    if len(set(value)) != len(value):
        raise _bad(where, f"skip.{name} repeats a layer")
    return frozenset(value)


def from_dict(d, where="<dict>") -> Profile:
    """Validate a parsed profile; raise VeridraftError naming `where` and the problem."""
    if not isinstance(d, dict):
        raise _bad(where, f"expected a JSON object, got {type(d).__name__}")
    if d.get("format") != FORMAT:
        raise _bad(where, f"format must be {FORMAT!r}, got {d.get('format')!r}")
    if d.get("method") != METHOD:
        raise _bad(where, f"method must be {METHOD!r}, got {d.get('method')!r}")
    m = d.get("model")
    if not isinstance(m, dict):
        raise _bad(where, "missing the model object")
    name = m.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(where, f"model.name must be a non-empty string, got {name!r}")
    n_layers = m.get("n_layers")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise _bad(where, f"model.n_layers must be a positive integer, got {n_layers!r}")
    sha = m.get("source_sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise _bad(where, f"model.source_sha256 must be 64 hex digits or null, got {sha!r:.80}")
    arch = m.get("architecture")
    if arch is not None and not isinstance(arch, str):
        raise _bad(where, "model.architecture must be a string or null")
    prec = d.get("precision")
    if not isinstance(prec, str) or not prec:
        raise _bad(where, f"precision must be a non-empty string, got {prec!r}")
    s = d.get("skip")
    if not isinstance(s, dict) or set(s) != {"attn", "mlp"}:
        raise _bad(where, "skip must be an object with exactly 'attn' and 'mlp' lists")
    skip = Skip(
        attn=_layers(where, "attn", s["attn"], n_layers),
        mlp=_layers(where, "mlp", s["mlp"], n_layers),
    )
    if len(skip.attn) == n_layers and len(skip.mlp) == n_layers:
        raise _bad(where, "the skip set bypasses every layer")
    dr = d.get("drafter")
    if not isinstance(dr, dict):
        raise _bad(where, "missing the drafter object (gamma, num_tokens)")
    gamma = dr.get("gamma")
    if (
        isinstance(gamma, bool)
        or not isinstance(gamma, int | float)
        or not math.isfinite(gamma)
        or not 0.0 <= gamma <= 1.0
    ):
        raise _bad(where, f"drafter.gamma must be a number in [0, 1], got {gamma!r}")
    k = dr.get("num_tokens")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise _bad(where, f"drafter.num_tokens must be a positive integer, got {k!r}")
    extra = {}
    for key in ("figures", "search", "machine"):
        v = d.get(key, {})
        if not isinstance(v, dict):
            raise _bad(where, f"{key} must be an object")
        extra[key] = v
    for key in ("date", "command"):
        v = d.get(key, "")
        if not isinstance(v, str):
            raise _bad(where, f"{key} must be a string")
        extra[key] = v
    return Profile(
        model=name,
        n_layers=n_layers,
        precision=prec,
        skip=skip,
        gamma=float(gamma),
        num_tokens=k,
        source_sha256=sha,
        architecture=arch,
        **extra,
    )


# -------------------------------------------------------------------------------- files


def load_profile(path: str | Path) -> Profile:
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VeridraftError(f"layerskip profile not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VeridraftError(f"cannot read layerskip profile {path}: {e}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(path, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    p = from_dict(d, path)
    p.path = path
    return p


def portable_path(value: str, base: Path | None = None) -> str:
    """A file path as a profile records it: relative to `base` (default: the working directory)
    when the file lies under it, else the file's name. A profile is shared and shipped, and an
    absolute path would only name the layout of the machine that wrote it."""
    p = Path(value).expanduser()
    if not p.is_absolute():
        return value
    try:
        return p.resolve().relative_to((base or Path.cwd()).resolve()).as_posix()
    except ValueError:
        return p.name


def recorded_path(value: str) -> str:
    """A path as a shared result file records it: under $VERIDRAFT_HOME as
    `$VERIDRAFT_HOME/...`, else as `portable_path` gives it."""
    from .models.catalog import home

    p = Path(value).expanduser()
    if p.is_absolute():
        try:
            return "$VERIDRAFT_HOME/" + p.resolve().relative_to(home().resolve()).as_posix()
        except ValueError:
            pass
    return portable_path(value)


# Entries of `search` that name files; `command` gets the same treatment word by word.
PATH_KEYS = ("questions_file", "trials_file")


def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write atomically (a temporary file renamed into place); validate first. File paths in
    `search` and `command` are stored portable (see portable_path)."""
    path = Path(path).expanduser()
    d = profile.to_dict()
    d["search"] = {
        k: portable_path(v) if k in PATH_KEYS and isinstance(v, str) else v
        for k, v in d["search"].items()
    }
    d["command"] = " ".join(
        portable_path(w) if w.startswith(("/", "~")) else w for w in d["command"].split(" ")
    )
    from_dict(json.loads(json.dumps(d)), path)  # never write what would not load
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a shared or shipped profile unreadable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def search_dirs() -> list[Path]:
    """Where profiles are looked up, in order: $VERIDRAFT_HOME/profiles, then shipped ones."""
    return [profiles_home(), SHIPPED_DIR]


def find_profile_path(model: str, precision: str | None) -> tuple[Path, bool] | None:
    """(path, same_precision) of the profile for `model`, or None. Exact precision first."""
    dirs = search_dirs()
    if precision:
        for d in dirs:
            p = d / file_name(model, precision)
            if p.is_file():
                return p, True
    prefix = f"{METHOD}.{safe_name(model)}."
    for d in dirs:
        hits = sorted(d.glob(f"{prefix}*.json")) if d.is_dir() else []
        # a longer model name may share the prefix: keep <method>.<name>.<precision>.json only
        hits = [h for h in hits if "." not in h.name[len(prefix) : -len(".json")]]
        if hits:
            return hits[0], False
    return None


def model_identity(model) -> dict:
    """name, precision, n_layers, source_sha256, architecture of a LoadedModel (or a net)."""
    net = getattr(model, "net", model)
    cfg = getattr(net, "config", None)
    sha = None
    path = getattr(model, "path", None)
    if path is not None:
        try:
            meta = json.loads((Path(path) / "veridraft.json").read_text())
            sha = meta.get("source_sha256")
        except (OSError, ValueError, AttributeError):
            sha = None
    arch = None
    if path is not None:
        try:
            arch = json.loads((Path(path) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            arch = None
    return {
        "name": getattr(model, "name", None),
        "precision": getattr(model, "precision", None),
        "n_layers": getattr(cfg, "n_layers", None),
        "source_sha256": sha if isinstance(sha, str) else None,
        "architecture": arch,
    }


def check_matches(profile: Profile, model) -> None:
    """Raise VeridraftError when `profile` was made for other weights than `model`'s."""
    ident = model_identity(model)
    where = profile.path or "<profile>"
    if ident["n_layers"] is not None and ident["n_layers"] != profile.n_layers:
        raise _bad(
            where,
            f"made for a {profile.n_layers}-layer model, but {ident['name']} has "
            f"{ident['n_layers']} layers",
        )
    sha = ident["source_sha256"]
    if sha and profile.source_sha256 and sha != profile.source_sha256:
        raise _bad(
            where,
            f"made for weights sha256 {profile.source_sha256[:12]}…, but {ident['name']} was "
            f"converted from {sha[:12]}…",
        )


def profile_for(model, spec: str | None = None) -> Profile | None:
    """The profile `draft="layerskip"` uses for `model`.

    spec None: look up by the model's name and precision (module docstring); "none": no profile;
    anything else: a path to a profile file. Returns None when no profile exists; raises
    VeridraftError for a profile that exists but is invalid or made for other weights.
    """
    if spec is not None:
        if str(spec).strip().lower() in ("none", "off", "no", ""):
            return None
        prof = load_profile(spec)
        check_matches(prof, model)
        return prof
    name = getattr(model, "name", None)
    if not name:
        return None
    found = find_profile_path(name, getattr(model, "precision", None))
    if found is None:
        return None
    prof = load_profile(found[0])
    if prof.model != name:
        raise _bad(found[0], f"the file is named for {name} but holds a profile for {prof.model}")
    check_matches(prof, model)
    return prof
