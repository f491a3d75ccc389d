"""Segments of a prompt: which ids are the system prompt, a document, the question.

A segment is `(kind, start, end)` over the prompt ids `[start, end)`. Selection rules of the
sparse-cache drafters keep the kinds in `KEEP` whole and prune the rest (a document, long user
turns), as SpecVLM and Sparse-to-Dense keep the text and prune visual tokens.

Chat messages produce segments: each message's content becomes one segment of kind
`message["segment"]` when given, else by role (system -> "system", user -> "user", assistant ->
"answer"); template text between contents is not in any segment. A raw prompt is marked with
`encode_parts([(kind, text), ...])`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import VeridraftError

Segment = tuple[str, int, int]
KINDS = ("system", "document", "question", "user", "answer", "image", "video")
KEEP = frozenset({"system", "question"})  # never pruned by a selection rule
_ROLE_KIND = {"system": "system", "user": "user", "assistant": "answer", "tool": "document"}


def _check_kind(kind) -> str:
    if kind not in KINDS:
        raise VeridraftError(f"segment kind {kind!r} is not one of {', '.join(KINDS)}")
    return kind


def _spans_to_segments(offsets, spans: list[tuple[str, int, int]]) -> list[Segment]:
    """Character spans -> token spans: a token belongs to the span its first character is in."""
    out: list[Segment] = []
    i = 0
    n = len(offsets)
    for kind, a, b in spans:
        while i < n and offsets[i][0] < a:
            i += 1
        j = i
        while j < n and offsets[j][0] < b:
            j += 1
        if j > i:
            out.append((kind, i, j))
        i = j
    return out


def _encode(tok, text: str, spans, add_special_tokens: bool) -> tuple[list[int], list[Segment]]:
    enc = tok.backend.encode(text, add_special_tokens=add_special_tokens)
    # special tokens added around the text have (0, 0) offsets: keep them out of segments
    offsets = [
        (o[0], o[1]) if sid == 0 or o != (0, 0) else (-1, -1)
        for o, sid in zip(enc.offsets, enc.special_tokens_mask)
    ]
    return list(enc.ids), _spans_to_segments(offsets, spans)


def encode_parts(tok, parts: Sequence[tuple[str, str]]) -> tuple[list[int], list[Segment]]:
    """Raw text made of marked parts, joined as given: (ids, segments)."""
    text, spans = "", []
    for kind, piece in parts:
        spans.append((_check_kind(kind), len(text), len(text) + len(piece)))
        text += piece
    return _encode(tok, text, spans, True)


def encode_chat(tok, messages: list[dict]) -> tuple[list[int], list[Segment]]:
    """Chat messages through the model's template: (ids, segments), one segment per message
    content found in the rendered text."""
    clean = [{k: v for k, v in m.items() if k != "segment"} for m in messages]
    text = tok.apply_chat_template(clean)
    spans, at = [], 0
    for m in messages:
        content = m.get("content")
        kind = m.get("segment") or _ROLE_KIND.get(m.get("role"), "user")
        _check_kind(kind)
        if not isinstance(content, str) or not content:
            continue
        found = text.find(content, at)
        if found < 0:  # the template changed the content (e.g. stripped it): match it stripped
            found = text.find(content.strip(), at)
            content = content.strip()
        if found < 0:
            continue
        spans.append((kind, found, found + len(content)))
        at = found + len(content)
    return _encode(tok, text, spans, False)
