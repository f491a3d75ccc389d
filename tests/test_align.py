"""Token bytes across vocabularies, DTW and longest-common-diagonal alignment (align.py), on
hand-made token sequences with known paths: merges, splits, unicode, leading spaces, byte
fallback."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from veridraft.align import (
    cost_matrix,
    dtw_path,
    kept_by_path,
    lcd_path,
    longest_common_diagonal,
    norm_piece,
    piece_bytes,
    piece_distance,
    token_bytes,
)


def bl(*pieces: str) -> list[str]:
    """GPT-2 byte-level pieces -> normalised strings."""
    return [norm_piece(piece_bytes(p, "bytelevel")) for p in pieces]


def sp(*pieces: str) -> list[str]:
    """SentencePiece pieces -> normalised strings."""
    return [norm_piece(piece_bytes(p, "sentencepiece")) for p in pieces]


# ------------------------------------------------------------------ token bytes


def test_piece_bytes_bytelevel_markers_and_utf8():
    assert piece_bytes("Ġhello", "bytelevel") == b" hello"
    assert piece_bytes("Ċ", "bytelevel") == b"\n"
    assert piece_bytes("ĊĊĠ", "bytelevel") == b"\n\n "
    assert piece_bytes("cafÃ©", "bytelevel") == "café".encode()
    assert piece_bytes("ĠðŁ", "bytelevel") == b" \xf0\x9f"  # first half of an emoji
    assert piece_bytes("<|im_start|>", "bytelevel") == b"<|im_start|>"  # not byte-level: text


def test_piece_bytes_sentencepiece_markers_and_byte_fallback():
    assert piece_bytes("▁hello", "sentencepiece") == b" hello"
    assert piece_bytes("▁▁", "sentencepiece") == b"  "
    assert piece_bytes("<0xE2>", "sentencepiece") == b"\xe2"
    assert piece_bytes("<0x0A>", "sentencepiece") == b"\n"
    assert piece_bytes("日本", "sentencepiece") == "日本".encode()
    assert piece_bytes("▁hello", "plain") == "▁hello".encode()


def test_same_text_compares_equal_across_schemes():
    assert bl("Ġthe") == sp("▁the")
    assert bl("Ċ") == sp("<0x0A>")
    # the byte 0xE2 as a byte-level piece and as a byte-fallback piece
    assert bl("âĢ") != sp("<0xE2>")
    assert bl("â") == sp("<0xE2>")


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_token_bytes_concatenate_to_the_decoded_text(real_model_dir, name):
    from veridraft.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(real_model_dir(name))
    tb = token_bytes(tok)
    assert tb.scheme == {"smollm2-135m": "bytelevel", "gemma3-270m": "sentencepiece"}[name]
    text = "Héllo wörld — 日本語 🤖 café\n\n  x\t<|im_start|>user\nTschüß, ça va? ½ ∑ 𝔘"
    ids = tok.encode(text, add_special_tokens=False)
    assert tb.of(ids) == tok.decode(ids).encode("utf-8") == text.encode("utf-8")
    assert tb.ends(ids)[-1] == len(text.encode("utf-8"))


# ------------------------------------------------------------------ distances


def test_piece_distance_ignores_space_markers_unless_only_spaces():
    assert piece_distance(" the", "the") == 0
    assert piece_distance(" the", " tho") == 1
    assert piece_distance(" ", " ") == 0
    assert piece_distance(" ", "\n") == 1
    assert piece_distance("  ", " x") == 1  # whitespace-only piece: compared with its spaces
    assert piece_distance("  ", "x") == 2
    c = cost_matrix([" a", " ", "bc"], ["a", "\n", " bd"])
    assert c.tolist() == [[0, 1, 2], [1, 1, 2], [2, 2, 1]]


# ------------------------------------------------------------------ DTW, known paths


def test_dtw_identity_is_the_diagonal():
    a = bl("ĠThe", "Ġcat", "Ġsat")
    assert dtw_path(a, sp("▁The", "▁cat", "▁sat")) == [(0, 0), (1, 1), (2, 2)]


def test_dtw_merge_two_draft_tokens_into_one_target_token():
    a = bl("ĠHon", "olulu", "Ġis")
    b = sp("▁Honolulu", "▁is")
    path = dtw_path(a, b)
    assert path == [(0, 0), (1, 0), (2, 1)]
    # accepting " Honolulu" covers both draft tokens; accepting nothing covers none
    assert kept_by_path(path, 3, 1) == 2
    assert kept_by_path(path, 3, 0) == 0
    assert kept_by_path(path, 3, 2) == 3


def test_dtw_split_one_draft_token_into_two_target_tokens():
    a = bl("ĠHonolulu", "Ġis")
    b = sp("▁Hon", "olulu", "▁is")
    path = dtw_path(a, b)
    assert path == [(0, 0), (0, 1), (1, 2)]
    assert kept_by_path(path, 2, 1) == 0  # half of the draft token is not enough
    assert kept_by_path(path, 2, 2) == 1


def test_dtw_unicode_split_differently():
    # 日本語 as 日本|語 (draft) and 日|本語 (target): one to one, not many to many
    a = bl("ĠæĹ¥æľ¬", "èªŀ")
    b = sp("▁日", "本語")
    assert a[0] == norm_piece(" 日本".encode())
    assert dtw_path(a, b) == [(0, 0), (1, 1)]


def test_dtw_leading_spaces_and_whitespace_tokens():
    a = bl("ĠĠ", "Ġx", "Ċ", "Ġy")
    b = sp("▁", "▁▁x", "<0x0A>", "▁y")
    # the extra space moves between tokens; the newline and y match exactly
    path = dtw_path(a, b)
    assert path == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_dtw_byte_fallback_tokens():
    # 🤖 = F0 9F A4 96: byte-level pieces ' \xf0\x9f', '\xa4', '\x96'; byte-fallback one byte each
    a = bl("ĠðŁ", "¤", "ĸ", "Ġok")
    b = sp("▁", "<0xF0>", "<0x9F>", "<0xA4>", "<0x96>", "▁ok")
    path = dtw_path(a, b)
    assert path[-1] == (3, 5)
    assert (1, 3) in path and (2, 4) in path
    assert {j for i, j in path if i == 0} == {0, 1, 2}
    assert kept_by_path(path, 4, 3) == 1  # ' ', F0, 9F accepted: the first draft piece
    assert kept_by_path(path, 4, 5) == 3


def test_dtw_band_restricts_the_path_and_widens_when_lengths_differ():
    a = bl("Ġa", "Ġb", "Ġc", "Ġd", "Ġe", "Ġf")
    b = sp("▁f", "▁e", "▁d", "▁c", "▁b", "▁a")
    for w in (0, 1, 2):
        path = dtw_path(a, b, band=w)
        assert all(abs(i - j) <= w for i, j in path)
    assert dtw_path(a, b, band=0) == [(i, i) for i in range(6)]
    long = bl(*["Ġx"] * 12)
    path = dtw_path(long, sp("▁x"), band=2)  # |12 - 1| > band: widened, still ends at the end
    assert path[0] == (0, 0) and path[-1] == (11, 0) and len(path) == 12


def _cost(path, c):
    return sum(c[i, j] for i, j in path)


def _brute_best(c: np.ndarray) -> float:
    n, m = c.shape
    best = float("inf")

    # every monotone path = a sequence of steps (1,0), (0,1), (1,1)
    def rec(i, j, acc):
        nonlocal best
        acc += c[i, j]
        if acc >= best:
            return
        if (i, j) == (n - 1, m - 1):
            best = acc
            return
        if i + 1 < n and j + 1 < m:
            rec(i + 1, j + 1, acc)
        if i + 1 < n:
            rec(i + 1, j, acc)
        if j + 1 < m:
            rec(i, j + 1, acc)

    rec(0, 0, 0.0)
    return best


def test_dtw_unbanded_is_optimal_and_monotone_on_random_inputs():
    rng = random.Random(0)
    alphabet = ["a", "b", "ab", " a", "ba", "c", " ", "abc"]
    for _ in range(60):
        a = [rng.choice(alphabet) for _ in range(rng.randint(1, 6))]
        b = [rng.choice(alphabet) for _ in range(rng.randint(1, 6))]
        path = dtw_path(a, b, band=100)
        c = cost_matrix(a, b)
        assert path[0] == (0, 0) and path[-1] == (len(a) - 1, len(b) - 1)
        for (i0, j0), (i1, j1) in itertools.pairwise(path):
            assert (i1 - i0, j1 - j0) in {(1, 0), (0, 1), (1, 1)}
        assert _cost(path, c) == _brute_best(c)


# ------------------------------------------------------------------ longest common diagonal


def test_longest_common_diagonal():
    assert longest_common_diagonal([1, 2, 3, 4], [9, 2, 3, 4, 5]) == (1, 1, 3)
    assert longest_common_diagonal([5, 6, 7], [1, 2, 5, 6, 7]) == (0, 2, 3)
    assert longest_common_diagonal([1, 2], [3, 4]) == (0, 0, 0)
    # ties: the most recent run (UAG splices after the last match)
    assert longest_common_diagonal([1, 2, 9, 1, 2], [1, 2]) == (3, 0, 2)
    assert longest_common_diagonal([], [1]) == (0, 0, 0)


def test_lcd_path_aligns_around_the_diagonal():
    a = bl("ĠHon", "olulu", "Ġis", "Ġa", "Ġcity")
    b = sp("▁Honolulu", "▁is", "▁a", "▁city")
    path = lcd_path(a, b)
    assert (2, 1) in path and (3, 2) in path and (4, 3) in path
    assert path[0] == (0, 0)
    assert kept_by_path(path, 5, 1) == 2
    assert kept_by_path(path, 5, 3) == 4
    # no common piece at all: proportional stretch, still monotone and complete
    p = lcd_path(bl("Ġa", "Ġb"), sp("▁x", "▁y", "▁z", "▁w"))
    assert p[0] == (0, 0) and p[-1] == (1, 3)
    assert sorted({i for i, _ in p}) == [0, 1] and sorted({j for _, j in p}) == [0, 1, 2, 3]
