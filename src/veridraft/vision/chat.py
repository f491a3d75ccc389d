"""Chat messages with images and videos -> a prompt the Qwen2-VL decoder runs, and generation.

mp = prepare(model, messages)        # ids, segments, the processed media, the VisionPrompt
with model.net.use_prompt(mp.vision):
    new, stats = generate_ids(model, mp.ids, segments=mp.segments, draft="pruned")

(`veridraft.multimodal.generate` does this from messages to text.)

`prepare` renders the Qwen2-VL chat template with one pad per image or video, expands each pad
to the item's token count, tokenizes once, runs the vision tower and computes the M-RoPE
positions. The visual tokens become prompt segments of kind "image" / "video" and the user's
text becomes "question" (a message's or content item's "segment" key overrides it), so the
sparse-cache drafters keep the question whole and prune the video.

Decoding is veridraft's own loop with the model's VisionPrompt active: every drafter that reads
the target's own cache sees the vision embeddings and positions. A drafter with a text-only
draft model of its own cannot read the visual tokens: `check_drafter` refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import VeridraftError
from ..segments import KINDS, Segment
from . import processor as P
from .encoder import encode
from .positions import rope_index

_ROLE_KIND = {"system": "system", "user": "question", "assistant": "answer", "tool": "document"}


def net_of(model):
    return getattr(model, "net", model)


def is_multimodal(model) -> bool:
    """Whether `model` (a LoadedModel or a network) reads images and video."""
    return bool(getattr(net_of(model), "multimodal", False))


def require_multimodal(model) -> Any:
    net = net_of(model)
    if not is_multimodal(net):
        kind = getattr(getattr(net, "config", None), "model_type", type(net).__name__)
        raise VeridraftError(
            f"{getattr(model, 'name', kind)} ({kind}) is a text-only model and cannot read "
            "images or video; load a Qwen2-VL or Qwen2.5-VL model (an HF folder, or a GGUF "
            "with its mmproj)"
        )
    return net


def has_media(messages: Any) -> bool:
    """Whether chat messages hold an image or video item (content lists as `prepare` reads
    them: an item's "type", else its "image" / "video" key)."""
    if not isinstance(messages, list):
        return False
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        for item in content if isinstance(content, list) else ():
            if not isinstance(item, dict):
                continue
            kind = item.get("type") or (
                "image" if "image" in item else "video" if "video" in item else "text"
            )
            if kind in ("image", "video"):
                return True
    return False


def vision_prompt(net, ids: Sequence[int], inputs: Sequence[P.VisionInput]):
    """The VisionPrompt of prompt `ids` (pads already expanded) and its media in order: the
    vision tower's rows for the pads and the M-RoPE positions."""
    from ..models.qwen2_vl import VisionPrompt

    cfg = net.vision_config
    tid = net.token_ids
    images = [v for v in inputs if v.kind == "image"]
    videos = [v for v in inputs if v.kind == "video"]
    positions, delta = rope_index(
        list(ids),
        [v.grid_thw for v in images] or None,
        [v.grid_thw for v in videos] or None,
        [v.second_per_grid for v in videos] or None,
        image_token_id=tid["image"],
        video_token_id=tid["video"],
        spatial_merge_size=cfg.spatial_merge_size,
        tokens_per_second=cfg.tokens_per_second if cfg.family == "qwen2_5_vl" else None,
        text_after_vision=net.text_after_vision,
    )
    ids_t = torch.tensor(list(ids), dtype=torch.long)
    rows = torch.full(ids_t.shape, -1, dtype=torch.long)
    parts, used = [], 0
    # transformers scatters the image features into the image pads and the video features into
    # the video pads, each in order: one tower call per kind, as it makes them
    for items, pad in ((images, tid["image"]), (videos, tid["video"])):
        if not items:
            continue
        emb = encode(
            net.vision_weights,
            cfg,
            torch.cat([v.pixel_values for v in items]),
            [v.grid_thw for v in items],
        )
        where = (ids_t == pad).nonzero().flatten()
        if where.numel() != emb.shape[0]:  # rope_index checked the runs; this is a mismatch
            raise VeridraftError(
                f"the prompt has {where.numel()} pad tokens for {emb.shape[0]} vision rows; "
                "expand the pads with the processor's token counts"
            )
        rows[where] = used + torch.arange(emb.shape[0])
        parts.append(emb.float())
        used += emb.shape[0]
    dim = net.config.dim
    embeds = torch.cat(parts) if parts else torch.zeros(0, dim)
    if embeds.shape[1] != dim:
        raise VeridraftError(
            f"the vision tower gives rows of {embeds.shape[1]} values but the decoder is {dim} "
            "wide; the checkpoint's vision_config does not fit its text model"
        )
    return VisionPrompt(ids=ids_t, positions=positions, delta=delta, embeds=embeds, rows=rows)


@dataclass
class MultimodalPrompt:
    """A chat ready to decode: `ids` and `segments` as decode takes them, the processed
    media, the model's VisionPrompt."""

    ids: list[int]
    segments: list[Segment]
    inputs: list[P.VisionInput]
    vision: Any  # models.qwen2_vl.VisionPrompt
    text: str = ""
    counts: dict[str, int] = field(default_factory=dict)  # visual tokens per kind


def _render(messages: Sequence[dict[str, Any]], inputs: Sequence[P.VisionInput]):
    """The chat template's text with pads expanded, and character spans (kind, a, b) of the
    user's text and of each image or video's pads."""
    text, spans = "", []
    media = iter(inputs)

    def add(piece: str, kind: str | None = None) -> None:
        nonlocal text
        if kind is not None and piece:
            if kind not in KINDS:
                raise VeridraftError(f"segment kind {kind!r} is not one of {', '.join(KINDS)}")
            spans.append((kind, len(text), len(text) + len(piece)))
        text += piece

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise VeridraftError(
                "messages must be {'role': ..., 'content': ...} dicts; content a string or a "
                "list of {'type': 'text' | 'image' | 'video', ...} items"
            )
        if i == 0 and m["role"] != "system":
            add("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
        add(f"<|im_start|>{m['role']}\n")
        kind = m.get("segment") or _ROLE_KIND.get(m["role"], "user")
        content = m["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for item in items:
            t = item.get("type") or (
                "image" if "image" in item else "video" if "video" in item else "text"
            )
            if t in ("image", "video"):
                v = next(media)
                add(P.VISION_START)
                add(v.pad_token * v.num_tokens, item.get("segment") or v.kind)
                add(P.VISION_END)
            else:
                add(str(item.get("text", "")), item.get("segment") or kind)
        add("<|im_end|>\n")
    add("<|im_start|>assistant\n")
    return text, spans


def encode_spans(tok, text: str, spans: list[tuple[str, int, int]]):
    """Tokenize `text` once (no special tokens added, as a rendered chat is) -> (ids, segments):
    a token belongs to the character span its first character is in (as segments.encode_chat
    marks chat messages)."""
    enc = tok.backend.encode(text, add_special_tokens=False)
    starts = [o[0] for o in enc.offsets]
    segments: list[Segment] = []
    i, n = 0, len(starts)
    for kind, a, b in spans:
        while i < n and starts[i] < a:
            i += 1
        j = i
        while j < n and starts[j] < b:
            j += 1
        if j > i:
            segments.append((kind, i, j))
        i = j
    return list(enc.ids), segments


def prepare(model, messages: Sequence[dict[str, Any]]) -> MultimodalPrompt:
    """Chat messages (text, `{"type": "image", "image": PATH}`, `{"type": "video", "video":
    PATH, "fps": 2.0, ...}` items) -> a MultimodalPrompt for `model` (a LoadedModel)."""
    net = require_multimodal(model)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise VeridraftError("the model has no tokenizer; load it with veridraft.load(FOLDER)")
    tid = net.token_ids
    for name, want in ((P.IMAGE_PAD, tid["image"]), (P.VIDEO_PAD, tid["video"])):
        got = tok.token_to_id(name)
        if got != want:
            raise VeridraftError(
                f"the tokenizer maps {name} to {got}, the model's config to {want}; use the "
                "tokenizer that came with the model"
            )
    inputs = P.process_messages(messages)
    text, spans = _render(messages, inputs)
    ids, segments = encode_spans(tok, text, spans)
    vp = vision_prompt(net, ids, inputs)
    counts = {k: sum(v.num_tokens for v in inputs if v.kind == k) for k in ("image", "video")}
    return MultimodalPrompt(ids, segments, list(inputs), vp, text, counts)


# drafter attributes that hold a draft network of its own, or a drafter composed in
_OWN_NET, _PARTS = ("net",), ("fallback", "suffix", "drafters")


def draft_nets(drafter) -> list:
    """The draft networks of their own that `drafter` (and the drafters it is composed of)
    runs, besides the target."""
    if drafter is None:
        return []
    out = [n for a in _OWN_NET if (n := getattr(drafter, a, None)) is not None]
    for attr in _PARTS:
        part = getattr(drafter, attr, None)
        for p in part if isinstance(part, list | tuple) else [part]:
            if p is not None and p is not drafter and hasattr(p, "propose"):
                out += draft_nets(p)
    return out


def check_drafter(drafter, what: str = "") -> list:
    """Refuse a drafter whose draft model is text-only: it would read the prompt's visual
    tokens as their pad token ids, without the images or the video. Returns the multimodal
    draft networks (each reads the prompt through a VisionPrompt of its own tower)."""
    nets = draft_nets(drafter)
    for net in nets:
        if not getattr(net, "multimodal", False):
            name = what or getattr(drafter, "name", type(drafter).__name__)
            raise VeridraftError(
                f"draft {name!r} drafts with a text-only model, which cannot read the images or "
                "video of this prompt; use a drafter on the target itself (ngram, suffix, "
                "streaming, snapkv, topk, pruned, layerskip) or a Qwen2-VL draft model"
            )
    return nets
