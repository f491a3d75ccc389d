"""Prompt segments: chat messages and marked raw text produce (kind, start, end) spans that
round-trip through the chat templates, and generate() hands them to the drafter."""

from __future__ import annotations

import pytest

from veridraft.draft import Draft
from veridraft.errors import VeridraftError
from veridraft.segments import encode_chat, encode_parts
from veridraft.tokenizer import Tokenizer

DOC = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition."
MESSAGES = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": DOC, "segment": "document"},
    {"role": "user", "content": "Who is handsome, clever and rich?", "segment": "question"},
]


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_chat_segments_round_trip(real_model_dir, name):
    tok = Tokenizer.from_folder(real_model_dir(name))
    ids, segs = encode_chat(tok, MESSAGES)
    assert ids == tok.encode_chat(MESSAGES)  # the segment key does not change the rendering
    assert [s[0] for s in segs] == ["system", "document", "question"]
    for (_, a, b), m in zip(segs, MESSAGES):
        assert tok.decode(ids[a:b]).strip() == m["content"]
    ends = [0] + [b for _, _, b in segs]
    assert all(a >= e for (_, a, _), e in zip(segs, ends))  # in order, not overlapping


def test_marked_raw_text_round_trips(real_model_dir):
    tok = Tokenizer.from_folder(real_model_dir("smollm2-135m"))
    parts = [("document", DOC), ("question", "\n\nWho is rich?")]
    ids, segs = encode_parts(tok, parts)
    assert ids == tok.encode(DOC + "\n\nWho is rich?")
    assert [tok.decode(ids[a:b]) for _, a, b in segs] == [p for _, p in parts]
    with pytest.raises(VeridraftError, match="kind"):
        encode_parts(tok, [("chapter", DOC)])


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.segments = None

    def prefill(self, ctx) -> None:
        self.segments = list(ctx.segments)

    def propose(self, ctx, max_tokens):
        return Draft(tokens=[])

    def update(self, rnd) -> None:
        pass


def test_generate_hands_chat_segments_to_the_drafter(real_model):
    from veridraft import generate

    model = real_model("smollm2-135m")
    rec = Recorder()
    gen = generate(model, MESSAGES, max_new_tokens=3, draft=rec)
    kinds = [k for k, _, _ in rec.segments]
    assert kinds == ["system", "document", "question"]
    _, a, b = rec.segments[1]
    assert model.tokenizer.decode(gen.prompt_ids[a:b]).strip() == DOC
