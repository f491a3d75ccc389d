"""`generate()`: the public entry point, HF-style keywords on top of `decode`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .decode import decode
from .errors import VeridraftError
from .sampling import SamplingParams
from .stats import Stats

Messages = list[dict]


@dataclass
class Generation:
    ids: list[int]  # generated ids only (EOS included when it ended the text)
    text: str  # generated text, special tokens removed, cut before a stop string
    stats: Stats
    prompt_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" | "stop" | "length"

    def __str__(self) -> str:
        return self.text


def prompt_ids_for(model, prompt: str | Messages, chat: bool | None = None) -> list[int]:
    """Token ids for a raw prompt or chat messages.

    Messages use the model's chat template when it has one; a base model gets the contents
    joined as raw text. A string is raw text unless chat=True (then it becomes one user turn).
    """
    tok = model.tokenizer
    if isinstance(prompt, str):
        if chat and tok.has_chat_template:
            return tok.encode_chat([{"role": "user", "content": prompt}])
        return tok.encode(prompt)
    if not isinstance(prompt, list) or not all(
        isinstance(m, dict) and "content" in m for m in prompt
    ):
        raise VeridraftError(
            "prompt must be a string or a list of {'role': ..., 'content': ...} messages"
        )
    if tok.has_chat_template and chat is not False:
        return tok.encode_chat(prompt)
    return tok.encode("\n\n".join(m["content"] for m in prompt))


def generate(
    model,
    prompt: str | Messages,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stream: Callable[[str], None] | None = None,
    draft=None,
    chat: bool | None = None,
    **draft_options,
) -> Generation:
    """Generate text from a loaded model (see `veridraft.load`).

    draft: None (plain decoding), a method spec such as "ngram", "ngram:num_tokens=8",
    "layerskip", "model:NAME", or a Drafter instance; draft_options go to the drafter.
    stream: called with each new piece of text as soon as it is final.
    """
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise VeridraftError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise VeridraftError("stop strings must be non-empty strings")
    ids = prompt_ids_for(model, prompt, chat)
    if not ids:
        raise VeridraftError("the prompt is empty")
    ctx_len = model.context_length
    if len(ids) + max_new_tokens > ctx_len:
        raise VeridraftError(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"context length of {model.name} ({ctx_len}); shorten the prompt or lower "
            "max_new_tokens"
        )
    from .drafters import make_drafter

    drafter = make_drafter(draft, model, **draft_options)
    generator = torch.Generator().manual_seed(
        seed if seed is not None else int(torch.seed() % 2**63)
    )
    tok = model.tokenizer
    text_out = _TextStream(tok, stops, stream)
    new, stats = decode(
        model.net,
        ids,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        generator=generator,
        drafter=drafter,
        eos_ids=tok.eos_ids,
        should_stop=text_out.stop_point if stops else None,
        on_tokens=text_out.push if stream else None,
        tokenizer=tok,
    )
    if drafter is not None:
        from .costmodel import explain, load_cost

        stats.notes.extend(explain(stats, load_cost(model)))
    text, reason = text_out.final(new)
    if stream:
        text_out.flush(text)
    return Generation(ids=new, text=text, stats=stats, prompt_ids=ids, finish_reason=reason)


class _TextStream:
    """Turns committed ids into text pieces, holding back what may still change: an incomplete
    UTF-8 sequence, or a tail that could be the start of a stop string."""

    def __init__(self, tok, stops: list[str], callback) -> None:
        self.tok, self.stops, self.callback = tok, stops, callback
        self.ids: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    def _text(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        text = self._text(self.ids)
        end = len(text) - self.hold
        # A complete stop string may sit inside the held-back window's left edge: never send
        # it, nor anything after it (the final text is cut there).
        hits = [
            i for i in (text.find(s, max(0, self.sent - self.hold)) for s in self.stops) if i >= 0
        ]
        if hits:
            end = min(end, min(hits))
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        if end > self.sent:
            self.callback(text[self.sent : end])
            self.sent = end

    def flush(self, final_text: str) -> None:
        if len(final_text) > self.sent:
            self.callback(final_text[self.sent :])
        self.sent = len(final_text)

    def stop_point(self, new: list[int]) -> int | None:
        text = self._text(new)
        hit = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit < 0:
            return None
        stop_end = min(text.find(s) + len(s) for s in self.stops if text.find(s) == hit)
        # Fewest ids whose text already contains the stop string.
        for n in range(1, len(new) + 1):
            if len(self._text(new[:n])) >= stop_end:
                return n
        return len(new)

    def final(self, new: list[int]) -> tuple[str, str]:
        text = self._text(new)
        for s in self.stops:
            i = text.find(s)
            if i >= 0:
                cut = min(i, *(text.find(t) for t in self.stops if text.find(t) >= 0))
                return text[:cut], "stop"
        if new and new[-1] in self.tok.eos_ids:
            return text, "eos"
        return text, "length"
