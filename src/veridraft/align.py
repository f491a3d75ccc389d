"""Token strings across vocabularies, and two ways to align token sequences.

Used by the `universal` drafter (drafters/universal.py), which drafts in one vocabulary and
verifies in another.

Token bytes
    `token_bytes(tokenizer)` gives, for every id, the exact bytes the token stands for in the text,
    so that concatenating the bytes of a sequence of ids gives `decode(ids)` as UTF-8 - also when a
    token holds only part of a multi-byte character. Three schemes are recognised from the
    tokenizer's decoder: GPT-2 byte-level (each character of the piece stands for one byte: 'Ġ' is
    a space, 'Ċ' a newline), SentencePiece-style ('▁' is a space, `<0xE2>` is the raw byte 0xE2)
    and plain (the piece is the text). Added / special tokens stand for their content.

Token strings for alignment
    `norm_piece(bytes)` maps token bytes to a comparable string: the bytes as Latin-1 (one
    character per byte, so a byte-fallback `<0xE2>` and the byte-level piece 'â' - both the byte
    0xE2 - compare equal, and a character split differently still costs only the differing
    bytes), with space markers normalised away as TokenTiming does: the distance compares the
    pieces without spaces, or with them when that leaves either empty (a pure whitespace token).

Alignments
    `dtw_path(a, b, band)`: dynamic time warping (TokenTiming's "dynamic token warping") between
    two sequences of normalised strings, cost = Levenshtein distance (rapidfuzz), the Sakoe-Chiba
    band |i - j| <= band (widened to |len(a) - len(b)| when needed so that a path exists),
    backtracking with ties going diagonal. Returns the monotone many-to-many path from (0, 0) to
    (len(a) - 1, len(b) - 1).
    `longest_common_diagonal(a, b)`: HF universal assisted generation's `_get_tokens_diag`
    primitive - the longest run of equal consecutive items at the same offset in a and b.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from functools import lru_cache

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

SCHEMES = ("bytelevel", "sentencepiece", "plain")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: piece character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def piece_bytes(piece: str, scheme: str) -> bytes:
    """The bytes a vocabulary piece stands for under `scheme` (see the module docstring)."""
    if scheme == "bytelevel":
        dec = _byte_decoder()
        try:
            return bytes(dec[c] for c in piece)
        except KeyError:  # not a byte-level piece (an added token): its text
            return piece.encode("utf-8")
    if scheme == "sentencepiece":
        m = _BYTE_PIECE.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("▁", " ").encode("utf-8")
    if scheme == "plain":
        return piece.encode("utf-8")
    raise ValueError(f"unknown token scheme {scheme!r}; valid: {', '.join(SCHEMES)}")


def detect_scheme(backend) -> str:
    """The piece scheme of a `tokenizers.Tokenizer`, from its decoder (and model)."""
    dec = repr(getattr(backend, "decoder", None))
    if "ByteLevel" in dec:
        return "bytelevel"
    if "ByteFallback" in dec or "Metaspace" in dec or "▁" in dec:
        return "sentencepiece"
    return "plain"


class TokenBytes:
    """id -> bytes for one tokenizer (a veridraft Tokenizer or a `tokenizers.Tokenizer`).

    Filled lazily (a 262k vocabulary costs ~0.2 s to fill at once); `of(ids)` concatenates.
    """

    def __init__(self, tokenizer) -> None:
        backend = getattr(tokenizer, "backend", tokenizer)
        self.backend = backend
        self.scheme = detect_scheme(backend)
        self.added = {
            i: t.content.encode("utf-8") for i, t in backend.get_added_tokens_decoder().items()
        }
        self.special = {
            i for i, t in backend.get_added_tokens_decoder().items() if getattr(t, "special", 0)
        }
        self._cache: dict[int, bytes] = {}

    def __getitem__(self, i: int) -> bytes:
        b = self._cache.get(i)
        if b is None:
            if i in self.added:
                b = self.added[i]
            else:
                piece = self.backend.id_to_token(i)
                b = b"" if piece is None else piece_bytes(piece, self.scheme)
            self._cache[i] = b
        return b

    def of(self, ids: Sequence[int]) -> bytes:
        return b"".join(self[i] for i in ids)

    def ends(self, ids: Sequence[int], start: int = 0) -> list[int]:
        """Cumulative byte end offsets of ids, starting at `start`."""
        out = []
        n = start
        for i in ids:
            n += len(self[i])
            out.append(n)
        return out


_TOKEN_BYTES: dict[int, TokenBytes] = {}


def token_bytes(tokenizer) -> TokenBytes:
    """The (shared, lazily filled) TokenBytes of a tokenizer."""
    key = id(getattr(tokenizer, "backend", tokenizer))
    tb = _TOKEN_BYTES.get(key)
    if tb is None or tb.backend is not getattr(tokenizer, "backend", tokenizer):
        tb = _TOKEN_BYTES[key] = TokenBytes(tokenizer)
    return tb


# ------------------------------------------------------------------------------------------
# normalised strings and distances


def norm_piece(b: bytes) -> str:
    """Token bytes -> the string compared by the alignment (Latin-1: one char per byte)."""
    return b.decode("latin-1")


def _strip_spaces(s: str) -> str:
    return s.replace(" ", "")


def piece_distance(a: str, b: str) -> int:
    """TokenTiming's token distance: Levenshtein of the pieces without space markers, or with
    them when removing them leaves either piece empty."""
    sa, sb = _strip_spaces(a), _strip_spaces(b)
    if not sa or not sb:
        return Levenshtein.distance(a, b)
    return Levenshtein.distance(sa, sb)


def cost_matrix(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """[len(a), len(b)] piece distances (rapidfuzz's C cdist on the stripped pieces, then the
    pure-whitespace pairs recomputed with the spaces kept)."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    sa = [_strip_spaces(x) for x in a]
    sb = [_strip_spaces(x) for x in b]
    c = cdist(sa, sb, scorer=Levenshtein.distance, dtype=np.int32, workers=1).astype(np.float64)
    for i, x in enumerate(sa):
        if not x:
            for j in range(len(b)):
                c[i, j] = Levenshtein.distance(a[i], b[j])
    for j, y in enumerate(sb):
        if not y:
            for i in range(len(a)):
                c[i, j] = Levenshtein.distance(a[i], b[j])
    return c


# ------------------------------------------------------------------------------------------
# DTW


def dtw_path(a: Sequence[str], b: Sequence[str], band: int = 8) -> list[tuple[int, int]]:
    """Banded DTW between piece strings; the path as (i, j) pairs, (0, 0) ... (n-1, m-1)."""
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    return dtw_path_from_cost(cost_matrix(a, b), band)


def dtw_path_from_cost(cost: np.ndarray, band: int = 8) -> list[tuple[int, int]]:
    n, m = cost.shape
    w = max(int(band), abs(n - m))
    inf = float("inf")
    d = [[inf] * (m + 1) for _ in range(n + 1)]
    d[0][0] = 0.0
    c = cost.tolist()
    for i in range(1, n + 1):
        ci = c[i - 1]
        di, dp = d[i], d[i - 1]
        for j in range(max(1, i - w), min(m, i + w) + 1):
            best = dp[j - 1]
            if dp[j] < best:
                best = dp[j]
            if di[j - 1] < best:
                best = di[j - 1]
            di[j] = ci[j - 1] + best
    # backtrack; ties prefer the diagonal, then the longer sequence's step
    path = [(n - 1, m - 1)]
    i, j = n, m
    while i > 1 or j > 1:
        if i == 1:
            j -= 1
        elif j == 1:
            i -= 1
        else:
            diag, up, left = d[i - 1][j - 1], d[i - 1][j], d[i][j - 1]
            if diag <= up and diag <= left:
                i, j = i - 1, j - 1
            elif up <= left:
                i -= 1
            else:
                j -= 1
        path.append((i - 1, j - 1))
    path.reverse()
    return path


def kept_by_path(path: Sequence[tuple[int, int]], n_a: int, n_b_accepted: int) -> int:
    """How many leading items of `a` are wholly covered by the first n_b_accepted items of b:
    the largest p such that every b index aligned with a[:p] is < n_b_accepted."""
    last = [-1] * n_a
    for i, j in path:
        if j > last[i]:
            last[i] = j
    p = 0
    while p < n_a and last[p] < n_b_accepted:
        p += 1
    return p


# ------------------------------------------------------------------------------------------
# longest common diagonal (HF universal assisted generation)


def longest_common_diagonal(a: Sequence[Hashable], b: Sequence[Hashable]) -> tuple[int, int, int]:
    """(start in a, start in b, length) of the longest run a[i + t] == b[j + t], t < length.

    Ties go to the run that ends last in b, then in a (the most recent match, which is what the
    splice in HF's `_get_tokens_diag` wants). Length 0 (and starts 0) when nothing matches.
    """
    best = (0, 0, 0)
    n, m = len(a), len(b)
    prev = [0] * (m + 1)
    for i in range(1, n + 1):
        cur = [0] * (m + 1)
        ai = a[i - 1]
        for j in range(1, m + 1):
            if ai == b[j - 1]:
                L = prev[j - 1] + 1
                cur[j] = L
                if L > best[2] or (L == best[2] and (j, i) >= (best[1] + L, best[0] + L)):
                    best = (i - L, j - L, L)
        prev = cur
    return best


def lcd_path(a: Sequence[str], b: Sequence[str]) -> list[tuple[int, int]]:
    """A monotone alignment built around the longest common diagonal of equal pieces: the
    diagonal maps one to one; the part before it and the part after it are each aligned by
    proportional stretching (every item gets at least one partner). Used to compare the LCD
    rule with DTW on the same inputs."""
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    i0, j0, L = longest_common_diagonal(list(a), list(b))
    if L == 0:
        return _stretch(0, n, 0, m)
    out = _stretch(0, i0, 0, j0)
    out += [(i0 + t, j0 + t) for t in range(L)]
    out += _stretch(i0 + L, n, j0 + L, m)
    return out


def _stretch(i0: int, i1: int, j0: int, j1: int) -> list[tuple[int, int]]:
    """A monotone path over the block [i0, i1) x [j0, j1), proportionally; when one side is
    empty, the other side's items attach to the neighbouring cell on the nearest side."""
    ni, nj = i1 - i0, j1 - j0
    if ni <= 0 and nj <= 0:
        return []
    if ni <= 0:
        i = max(i0 - 1, 0) if i0 > 0 else i0
        return [(i, j) for j in range(j0, j1)]
    if nj <= 0:
        j = max(j0 - 1, 0) if j0 > 0 else j0
        return [(i, j) for i in range(i0, i1)]
    steps = max(ni, nj)
    out = []
    for t in range(steps):
        i = i0 + (t * ni) // steps
        j = j0 + (t * nj) // steps
        if not out or out[-1] != (i, j):
            out.append((i, j))
    return out
