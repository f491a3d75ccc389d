"""Retrieval datastores (REST, He et al., 2023): a corpus as one token array and its suffix array.

Build once from files the user points to (`veridraft datastore build --tokenizer MODEL --from DIR
--name NAME`); it is stored under `$VERIDRAFT_HOME/datastores/NAME/` as `tokens.npy` (uint32;
documents separated by 0xFFFFFFFF, which no vocabulary reaches, so no match crosses two files),
`sa.npy` (the suffix array, from libdivsufsort via pydivsufsort, the library REST's libsais
counterpart binds) and `meta.json` (tokenizer, size, build time). A build writes a hidden
temporary folder and renames it into place, so an interrupted build leaves no half-written store.

Lookup (REST's `generate_candidates_and_draft_buffer`): the longest suffix of the context, from
`max_span` (16) down to `min_span` (2) ids, that occurs in the corpus (binary search over the
suffix array, O(span log N)); up to `max_hits` (5000) of its occurrences; the `long` (10) ids after
each; every continuation prefix counted. The prefixes' frequencies (count / occurrences) are path
probabilities, so the most frequent ones form a tree (a prefix is at least as frequent as its
extensions), best-first, as the suffix drafter's own tries do.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import VeridraftError

FORMAT = "veridraft-datastore/1"
SEP = np.uint32(0xFFFFFFFF)
# A fixed text whose ids identify a tokenizer: a store only serves targets that encode it alike.
PROBE = "def main(argv):\n    return {'x': [1, 2.5]}  # Hello, world! Ünïcode\n"
_HASH = np.uint64(1_000_003)


def datastores_dir() -> Path:
    env = os.environ.get("VERIDRAFT_HOME")
    home = Path(env).expanduser() if env else Path.home() / ".cache" / "veridraft"
    return home / "datastores"


@dataclass
class Retrieved:
    """Best-first tree nodes from the corpus: tokens, parents, path probabilities."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    span: int = 0

    @property
    def score(self) -> float:
        return sum(self.probs)


@dataclass
class Datastore:
    name: str
    tokens: np.ndarray  # [N] uint32
    sa: np.ndarray  # [N] suffix array
    meta: dict
    max_span: int = 16
    min_span: int = 2
    max_hits: int = 5000
    long: int = 10

    def find(self, query: list[int]) -> tuple[int, int]:
        """[lo, hi) of the suffix array whose suffixes start with `query`."""
        toks, sa, s = self.tokens, self.sa, len(query)

        def key(i: int) -> list[int]:
            p = int(sa[i])
            return toks[p : p + s].tolist()

        lo = bisect_left(range(len(sa)), query, key=key)
        hi = bisect_right(range(len(sa)), query, lo=lo, key=key)
        return lo, hi

    def continuations(self, context: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
        """([m, long] ids after each occurrence of the longest matching context suffix, [m, long]
        validity (False past a document end), the suffix length; m = 0 when nothing matches)."""
        found = None
        # a suffix that misses means every longer one misses too: grow until the first miss
        for s in range(self.min_span, min(self.max_span, len(context)) + 1):
            lo, hi = self.find(context[len(context) - s :])
            if hi <= lo:
                break
            found = (s, lo, hi)
        if found is None:
            return np.zeros((0, self.long), np.uint32), np.zeros((0, self.long), bool), 0
        s, lo, hi = found
        start = self.sa[lo : min(hi, lo + self.max_hits)].astype(np.int64) + s
        idx = start[:, None] + np.arange(self.long)
        inside = idx < len(self.tokens)
        conts = self.tokens[np.minimum(idx, len(self.tokens) - 1)]
        valid = np.cumprod(inside & (conts != SEP), axis=1).astype(bool)
        return conts, valid, s

    def speculate(self, context: list[int], max_nodes: int, min_prob: float, tree: bool = True):
        """The most frequent continuation prefixes as a best-first tree (or, with tree=False,
        the chain of most frequent next ids)."""
        conts, valid, span = self.continuations(context)
        m = len(conts)
        if m == 0 or max_nodes <= 0:
            return Retrieved()
        if not tree:
            return _path(conts, valid, m, max_nodes, min_prob, span)
        hashes = np.zeros(m, np.uint64)
        levels = []
        cands = []  # (count, depth, row) per distinct prefix
        with np.errstate(over="ignore"):
            for d in range(conts.shape[1]):
                hashes = hashes * _HASH + conts[:, d].astype(np.uint64) + np.uint64(1)
                levels.append(hashes.copy())
                rows = np.nonzero(valid[:, d])[0]
                if not len(rows):
                    break
                _, first, count = np.unique(hashes[rows], return_index=True, return_counts=True)
                keep = count >= max(1.0, min_prob * m)
                for c, r in zip(count[keep].tolist(), rows[first[keep]].tolist()):
                    cands.append((c, d, r))
        cands.sort(key=lambda x: (-x[0], x[1]))  # parents first: never rarer, never deeper
        out = Retrieved(span=span)
        index: dict[tuple[int, int], int] = {}
        for c, d, r in cands:
            if len(out.tokens) >= max_nodes:
                break
            parent = -1 if d == 0 else index.get((d - 1, int(levels[d - 1][r])))
            if parent is None:
                continue
            index[(d, int(levels[d][r]))] = len(out.tokens)
            out.tokens.append(int(conts[r, d]))
            out.parents.append(parent)
            out.probs.append(c / m)
        return out


def _path(conts, valid, m: int, max_nodes: int, min_prob: float, span: int) -> Retrieved:
    out = Retrieved(span=span)
    rows = np.arange(m)
    for d in range(min(conts.shape[1], max_nodes)):
        rows = rows[valid[rows, d]]
        if not len(rows):
            break
        ids, count = np.unique(conts[rows, d], return_counts=True)
        best = int(count.argmax())
        if count[best] / m < min_prob:
            break
        out.parents.append(d - 1)
        out.tokens.append(int(ids[best]))
        out.probs.append(float(count[best]) / m)
        rows = rows[conts[rows, d] == ids[best]]
    return out


# -- building --


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Suffix array of a uint32 array (lexicographic on the ids), by libdivsufsort."""
    from pydivsufsort import divsufsort

    if len(tokens) == 0:
        return np.zeros(0, np.int64)
    return np.asarray(divsufsort(np.ascontiguousarray(tokens, dtype=np.uint32)))


def check_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise VeridraftError(
            f"datastore name {name!r} must be letters, digits, '-', '_' or '.', not starting "
            "with '.'"
        )
    return name


def build_from_ids(
    docs: list[list[int]], name: str, meta: dict | None = None, root: Path | None = None
) -> Path:
    """Write a datastore of token-id documents; returns its folder. Atomic: the store appears
    complete under its name or not at all."""
    check_name(name)
    root = Path(root) if root is not None else datastores_dir()
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{name}.tmp-*"):  # left by an interrupted build
        shutil.rmtree(stale, ignore_errors=True)
    t0 = time.perf_counter()
    parts: list[np.ndarray] = []
    for d in docs:
        if d:
            parts.append(np.asarray(d, dtype=np.uint32))
            parts.append(np.array([SEP], dtype=np.uint32))
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
    sa = suffix_array(tokens)
    sa = sa.astype(np.int32 if len(tokens) < 2**31 else np.int64)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
    try:
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "sa.npy", sa)
        info = {
            "format": FORMAT,
            "name": name,
            "tokens": int(len(tokens)),
            "documents": sum(1 for d in docs if d),
            "sa_build_s": round(time.perf_counter() - t0, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(meta or {}),
        }
        info["bytes"] = sum(f.stat().st_size for f in tmp.iterdir())
        (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        final = root / name
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.old-"))
            os.replace(final, old / name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _LOADED.pop(str(root / name), None)
    return root / name


def tokenizer_folder(name: str) -> Path:
    """The folder holding tokenizer.json for a catalog name or a model folder."""
    from .models import catalog

    if name in catalog.CATALOG:
        folder = catalog.model_dir(name)
        if not catalog.is_complete(folder):
            raise VeridraftError(
                f"catalog model {name} is not pulled; run `veridraft models pull {name}` first"
            )
        return folder
    folder = Path(name).expanduser()
    if not (folder / "tokenizer.json").is_file():
        raise VeridraftError(
            f"{name!r} is neither a catalog model nor a folder with tokenizer.json; pass one of "
            f"{', '.join(sorted(catalog.CATALOG))} or such a folder"
        )
    return folder


def build(
    tokenizer_name: str,
    src: Path,
    name: str,
    pattern: str = "*.py",
    exclude: tuple[str, ...] = ("test", "tests", "site-packages", "__pycache__"),
    root: Path | None = None,
) -> dict:
    """Tokenize every file under `src` matching `pattern` (skipping folders named in `exclude`)
    and build the datastore `name`; returns its meta (sizes, build time)."""
    from .tokenizer import Tokenizer

    src = Path(src).expanduser()
    if not src.is_dir():
        raise VeridraftError(f"datastore source {str(src)!r} is not a folder; pass --from DIR")
    check_name(name)
    t0 = time.perf_counter()
    tok = Tokenizer.from_folder(tokenizer_folder(tokenizer_name))
    files = sorted(
        p
        for p in src.rglob(pattern)
        if p.is_file() and not any(part in exclude for part in p.relative_to(src).parts[:-1])
    )
    if not files:
        raise VeridraftError(f"no files matching {pattern!r} under {str(src)!r}")
    texts = []
    for p in files:
        try:
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
    docs = [e.ids for e in tok.backend.encode_batch(texts, add_special_tokens=False)]
    t_tok = time.perf_counter() - t0
    meta = {
        "tokenizer": tokenizer_name,
        "vocab_size": tok.vocab_size,
        "probe": tok.encode(PROBE, add_special_tokens=False),
        "source": str(src),
        "pattern": pattern,
        "files": len(texts),
        "text_bytes": sum(len(t.encode("utf-8")) for t in texts),
        "tokenize_s": round(t_tok, 3),
    }
    folder = build_from_ids(docs, name, meta, root)
    info = json.loads((folder / "meta.json").read_text())
    info["build_s"] = round(time.perf_counter() - t0, 3)
    (folder / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# -- loading --

_LOADED: dict[str, Datastore] = {}


def load(name: str, tokenizer=None, root: Path | None = None) -> Datastore:
    """The datastore `name` (memory-mapped, cached per process). With `tokenizer`, refuse a store
    built with a tokenizer that encodes differently."""
    check_name(name)
    folder = (Path(root) if root is not None else datastores_dir()) / name
    if not (folder / "meta.json").is_file():
        raise VeridraftError(
            f"no datastore {name!r} in {folder.parent}; build it with `veridraft datastore build "
            f"--tokenizer MODEL --from DIR --name {name}`"
        )
    store = _LOADED.get(str(folder))
    if store is None:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise VeridraftError(f"datastore {name!r} is not a {FORMAT} store; rebuild it")
        tokens = np.load(folder / "tokens.npy", mmap_mode="r")
        sa = np.load(folder / "sa.npy", mmap_mode="r")
        store = _LOADED[str(folder)] = Datastore(name, tokens, sa, meta)
    if tokenizer is not None and "probe" in store.meta:
        if tokenizer.encode(PROBE, add_special_tokens=False) != store.meta["probe"]:
            raise VeridraftError(
                f"datastore {name!r} was built with the {store.meta.get('tokenizer')} tokenizer, "
                "which encodes text differently from this model's; build one with this model's "
                "tokenizer (--tokenizer)"
            )
    return store
