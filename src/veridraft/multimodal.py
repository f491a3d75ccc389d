"""Generation from chat messages with images and videos (Qwen2-VL / Qwen2.5-VL models).

out = veridraft.generate(model, [{"role": "user", "content": [
    {"type": "video", "video": "clip.mp4", "fps": 2.0},
    {"type": "text", "text": "What happens in this video?"}]}], draft="pruned")

`veridraft.generate` sends messages that hold an image or a video here (`generate` below, the
same call for messages only).

vision/chat.py prepares the prompt (media through the processor and the vision tower, M-RoPE
positions, "video"/"image"/"question" segments); decoding is `generate_ids` with the model's
VisionPrompt active, so every method runs on it as on a text prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

from . import drafters
from .errors import VeridraftError
from .generate import NO_DRAFT, Generation, TextStream, draft_env, generate_ids
from .rules import split_method
from .stats import Stats
from .vision.chat import (
    MultimodalPrompt,
    check_drafter,
    prepare,
    require_multimodal,
    vision_prompt,
)

# generate_ids' own keywords; any other keyword is a drafter option
_GENERATE_KEYS = frozenset(
    {
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "sampling",
        "seed",
        "generator",
        "eos_ids",
        "should_stop",
        "on_tokens",
        "max_draft",
        "prefilled",
        "warn",
        "kv",
        "verify",
        "lossless",
        "prefill_chunk",
    }
)


def generate_prompt(
    model, mp: MultimodalPrompt, *, draft=None, env=None, **kw
) -> tuple[list[int], Stats]:
    """`generate_ids` for a prepared prompt: (new ids, stats). `draft` is a method spec, a
    Drafter or None ("auto" is plain decoding: the cost model knows text prompts only); the
    other keywords are generate_ids' or the drafter's options."""
    net = require_multimodal(model)
    if isinstance(draft, str):
        draft, rule = split_method(draft)
        if rule is not None:
            if kw.get("verify") is not None:
                raise VeridraftError(f"the rule is given twice: {rule!r} in draft= and in verify=")
            kw["verify"] = rule
        if draft is None or draft.strip().lower() in (*NO_DRAFT, "auto"):
            draft = None
    env = env or draft_env(model)
    options = {k: kw.pop(k) for k in list(kw) if k not in _GENERATE_KEYS}
    spec = draft if isinstance(draft, str) else ""
    drafter = drafters.make_drafter(draft, model, env=env, **options)
    with ExitStack() as stack:
        stack.enter_context(net.use_prompt(mp.vision))
        for dnet in check_drafter(drafter, spec):
            if dnet is not net:  # a draft VLM sees the media through its own tower
                stack.enter_context(dnet.use_prompt(vision_prompt(dnet, mp.ids, mp.inputs)))
        return generate_ids(model, mp.ids, draft=drafter, env=env, segments=mp.segments, **kw)


def generate(
    model,
    messages: Sequence[dict[str, Any]],
    max_new_tokens: int = 128,
    *,
    stop: str | Sequence[str] | None = None,
    stream: Callable[[str], None] | None = None,
    chat: bool | None = None,
    **kw,
) -> Generation:
    """Text for chat messages with images and videos (a LoadedModel of a Qwen2-VL or
    Qwen2.5-VL model); `veridraft.generate` routes such messages here. stop and stream as in
    `veridraft.generate`; the other keywords are generate_ids' (draft, kv, verify, temperature,
    seed, ...) and the drafter's options."""
    if chat is False:
        raise VeridraftError(
            "chat=False joins the messages as raw text, which cannot carry images or video; "
            "leave chat unset for messages with media"
        )
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise VeridraftError("stop strings must be non-empty strings")
    mp = prepare(model, messages)
    text_out = TextStream(model.tokenizer, stops, stream)
    new, stats = generate_prompt(
        model,
        mp,
        max_new_tokens=max_new_tokens,
        should_stop=text_out.stop_point if stops else None,
        on_tokens=text_out.push if stream else None,
        **kw,
    )
    text, reason = text_out.final(new)
    if stream:
        text_out.flush(text)
    return Generation(ids=new, text=text, stats=stats, prompt_ids=mp.ids, finish_reason=reason)
