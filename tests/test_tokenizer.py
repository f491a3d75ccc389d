"""Tokenizer parity with transformers on both catalog models, chat rendering, streaming."""

from __future__ import annotations

import json
import random

import pytest

from veridraft.bench.questions import default_questions_path
from veridraft.errors import VeridraftError
from veridraft.tokenizer import Tokenizer

DEV = default_questions_path()
MODELS = ["smollm2-135m", "gemma3-270m"]

TEXTS = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "line one\nline two\n\n\nend",
    "\ttabbed\r\nwindows line",
    "héllo wörld — ünïcode “quotes” …",
    "日本語のテキストと中文文本",
    "emoji 😀🎉👍🏽 and flags 🇫🇷 done",
    "Ελληνικά και русский текст",
    "<|im_start|>user\nhi<|im_end|>",
    "<bos>text<eos><end_of_turn>",
    "",
    " ",
    "\n",
    "x = [1, 2, 3]\nprint(x)  # comment\n    indented()",
    "1234567890 3.14159 1e-9",
    "a" * 200,
]


def _texts() -> list[str]:
    texts = list(TEXTS)
    if DEV.is_file():
        for i, line in enumerate(DEV.read_text().splitlines()):
            if i % 3 == 0:  # a third of the dev set: every category, multi-turn included
                texts += json.loads(line)["turns"]
    return texts


@pytest.fixture(scope="module", params=MODELS)
def pair(request, real_model_dir):
    """(our Tokenizer, transformers' tokenizer) for one model folder."""
    from transformers import AutoTokenizer

    folder = real_model_dir(request.param)
    return request.param, Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)


def test_encode_matches_transformers(pair):
    name, tok, hf = pair
    texts = _texts()
    assert len(texts) > 50
    for text in texts:
        assert tok.encode(text) == hf(text).input_ids, (name, text[:60])
        assert tok.encode(text, add_special_tokens=False) == (
            hf(text, add_special_tokens=False).input_ids
        ), (name, text[:60])


def test_decode_matches_transformers(pair):
    name, tok, hf = pair
    rng = random.Random(0)
    seqs = [tok.encode(t) for t in _texts()[:40]]
    seqs += [[rng.randrange(tok.vocab_size) for _ in range(200)] for _ in range(5)]
    for ids in seqs:
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            ), (name, ids[:10], skip)


def test_special_tokens(pair):
    name, tok, hf = pair
    assert tok.vocab_size == len(hf)
    assert tok.bos_id == hf.bos_token_id
    assert hf.eos_token_id in tok.eos_ids
    if name == "smollm2-135m":
        assert tok.encode("Hello")[0] != tok.bos_id  # adds nothing
        assert tok.id_to_token(2) == "<|im_end|>" and 2 in tok.eos_ids
        assert tok.token_to_id("<|im_start|>") == 1
    else:
        assert tok.encode("Hello")[0] == tok.bos_id == tok.token_to_id("<bos>") == 2
        assert tok.encode("Hello", add_special_tokens=False)[0] != 2
        assert 1 in tok.eos_ids and tok.id_to_token(1) == "<eos>"


def test_chat_template_matches_transformers(real_model_dir):
    from transformers import AutoTokenizer

    folder = real_model_dir("smollm2-135m")
    tok, hf = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    assert tok.has_chat_template
    user = [{"role": "user", "content": "What is 2+2? Answer with 😀."}]
    chats = [
        user,
        [{"role": "system", "content": "Be terse."}] + user,
        user + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
        [{"role": "user", "content": " spaces \n and newlines\n"}],
    ]
    for msgs in chats:
        for agp in (True, False):
            ours = tok.apply_chat_template(msgs, add_generation_prompt=agp)
            assert ours == hf.apply_chat_template(msgs, add_generation_prompt=agp, tokenize=False)
        ids = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert tok.encode_chat(msgs) == list(ids)


def test_base_model_has_no_chat_template(real_model_dir):
    tok = Tokenizer.from_folder(real_model_dir("gemma3-270m"))
    assert not tok.has_chat_template
    with pytest.raises(VeridraftError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_features(real_model_dir):
    base = Tokenizer.from_folder(real_model_dir("smollm2-135m"))
    tmpl = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('no tools here') }}{% endif %}"
        "{% generation %}[{{ m['role'] }}]{{ m['content'] | tojson }}{% endgeneration %}"
        "{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    tok = Tokenizer(base.backend, special_tokens=base.special_tokens, chat_template=tmpl)
    out = tok.apply_chat_template([{"role": "user", "content": 'é"', "name": None}])
    assert out == '<|im_start|>[user]"é\\"">'
    with pytest.raises(VeridraftError, match="no tools here"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(VeridraftError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("name", MODELS)
def test_stream_decoder_concatenates_to_decode(name, real_model_dir):
    tok = Tokenizer.from_folder(real_model_dir(name))
    rng = random.Random(1)
    texts = ["Ünïcode: 日本語 😀🎉👍🏽🇫🇷 — fin.", " leading", "a\n\nb 🧑‍💻 c", *TEXTS[:12]]
    held_back = 0
    for text in texts:
        ids = tok.encode(text)
        for skip in (False, True):
            for chunking in ("one", "random"):
                dec = tok.stream_decoder(skip_special_tokens=skip)
                pieces, i = [], 0
                while i < len(ids):
                    n = 1 if chunking == "one" else rng.randint(1, 4)
                    piece = dec.push(ids[i : i + n])
                    held_back += piece == ""
                    assert "\ufffd" not in piece or "\ufffd" in text
                    pieces.append(piece)
                    i += n
                pieces.append(dec.flush())
                assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), text
    assert held_back > 0  # multi-byte characters really were split across tokens


def test_stream_decoder_flushes_incomplete_bytes(real_model_dir):
    tok = Tokenizer.from_folder(real_model_dir("smollm2-135m"))
    ids = tok.encode("😀")
    assert len(ids) > 1  # byte-level BPE: the emoji spans several tokens
    dec = tok.stream_decoder()
    assert dec.push(ids[:-1]) == ""  # incomplete UTF-8: held back
    assert dec.flush() == tok.decode(ids[:-1])  # never completed: flushed as-is
