"""Generation from chat messages with images and videos (Qwen2-VL / Qwen2.5-VL models).

out = veridraft.multimodal.generate(model, [{"role": "user", "content": [
    {"type": "video", "video": "clip.mp4", "fps": 2.0},
    {"type": "text", "text": "What happens in this video?"}]}], draft="pruned")

vision/chat.py prepares the prompt (media through the processor and the vision tower, M-RoPE
positions, "video"/"image"/"question" segments); decoding is `generate_ids` with the model's
VisionPrompt active, so every method runs on it as on a text prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from . import drafters
from .errors import VeridraftError
from .generate import NO_DRAFT, Generation, draft_env, generate_ids
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
    model, messages: Sequence[dict[str, Any]], max_new_tokens: int = 128, **kw
) -> Generation:
    """Text for chat messages with images and videos (a LoadedModel of a Qwen2-VL or
    Qwen2.5-VL folder). Keywords are generate_ids' (draft, kv, verify, temperature, seed, ...)
    and the drafter's options."""
    mp = prepare(model, messages)
    new, stats = generate_prompt(model, mp, max_new_tokens=max_new_tokens, **kw)
    tok = model.tokenizer
    text = tok.decode(new, skip_special_tokens=True)
    reason = "eos" if new and new[-1] in (getattr(tok, "eos_ids", None) or ()) else "length"
    return Generation(ids=new, text=text, stats=stats, prompt_ids=mp.ids, finish_reason=reason)
