"""generate(): the decode loop's bookkeeping, stops, streaming and errors, on a tiny model with
the real smollm2 tokenizer (fast, but real text)."""

import pytest
import torch

import veridraft
from veridraft import VeridraftError
from veridraft.cli import main


@pytest.fixture(scope="module")
def tiny(tiny_smollm2_dir):
    return veridraft.load(tiny_smollm2_dir("tiny-llama"), precision="fp32")


def _reference_greedy(net, ids, n):
    """Greedy decoding with no cache reuse: a fresh prefill for every token."""
    ids = list(ids)
    out = []
    for _ in range(n):
        cache = net.new_cache(len(ids) + 1)
        logits = net(torch.tensor(ids), cache, num_logits=1)
        nxt = int(logits[-1].argmax())
        ids.append(nxt)
        out.append(nxt)
    return out


def test_greedy_matches_cacheless_reference(tiny):
    gen = veridraft.generate(tiny, "The quick brown fox", max_new_tokens=24)
    ref = _reference_greedy(tiny.net, gen.prompt_ids, len(gen.ids))
    assert gen.ids == ref
    assert gen.stats.new_tokens == len(gen.ids)
    assert gen.stats.tau == 1.0
    assert gen.text == tiny.tokenizer.decode(gen.ids, skip_special_tokens=True)


def test_stop_string_cuts_text_and_ids(tiny):
    full = veridraft.generate(tiny, "Hello", max_new_tokens=40)
    assert len(full.text) > 10, "tiny model should produce some text"
    stop = full.text[6:9]
    cut = veridraft.generate(tiny, "Hello", max_new_tokens=40, stop=[stop])
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert full.text.startswith(cut.text)
    assert cut.text == full.text[: full.text.find(stop)]
    assert len(cut.ids) <= len(full.ids)
    assert cut.ids == full.ids[: len(cut.ids)]


def test_stream_pieces_concatenate_to_text(tiny):
    for stop in (None, "e"):
        pieces = []
        gen = veridraft.generate(tiny, "Hello", max_new_tokens=30, stream=pieces.append, stop=stop)
        assert "".join(pieces) == gen.text


def test_eos_ends_generation(tiny):
    first = veridraft.generate(tiny, "Hello", max_new_tokens=5).ids[0]
    tiny.tokenizer.eos_ids.add(first)
    try:
        gen = veridraft.generate(tiny, "Hello", max_new_tokens=20)
    finally:
        tiny.tokenizer.eos_ids.discard(first)
    assert gen.ids == [first]
    assert gen.finish_reason == "eos"


def test_sampling_is_reproducible_with_seed(tiny):
    a = veridraft.generate(tiny, "Hi", max_new_tokens=16, temperature=1.0, seed=3)
    b = veridraft.generate(tiny, "Hi", max_new_tokens=16, temperature=1.0, seed=3)
    c = veridraft.generate(tiny, "Hi", max_new_tokens=16, temperature=1.0, seed=4)
    assert a.ids == b.ids
    assert a.ids != c.ids


def test_chat_messages_use_template(tiny):
    msgs = [{"role": "user", "content": "Hi"}]
    gen = veridraft.generate(tiny, msgs, max_new_tokens=2)
    assert gen.prompt_ids == tiny.tokenizer.encode_chat(msgs)


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10_000}, "context length"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 2.0}, "top_p"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_arguments_are_clear_errors(tiny, kwargs, word):
    with pytest.raises(VeridraftError, match=word):
        veridraft.generate(tiny, "Hello", **kwargs)


def test_media_on_a_text_model_is_a_one_line_error(tiny):
    content = [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is it?"}]
    msgs = [{"role": "user", "content": content}]
    with pytest.raises(VeridraftError, match="text-only model and cannot read images") as e:
        veridraft.generate(tiny, msgs, max_new_tokens=2)
    assert "\n" not in str(e.value) and "Qwen2-VL" in str(e.value)


def test_bad_prompt_type(tiny):
    with pytest.raises(VeridraftError, match="prompt"):
        veridraft.generate(tiny, [{"role": "user"}])


def test_cli_errors_are_one_line(capsys, tmp_path):
    rc = main(["generate", "hi", "--model", "no-such-model"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0
    assert "unknown model" in err and "smollm2-135m" in err
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert main(["generate", "hi", "--model", str(notes)]) == 2
    assert "not a model" in capsys.readouterr().err


def test_cli_generate_streams_and_prints_stats(capsys, tiny):
    rc = main(["generate", "Hello", "--model", str(tiny.path), "-n", "8", "--stats"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert len(out) > 1  # streamed text (a random tiny model may only emit whitespace)
    assert "8 tokens" in err and "tokens/s" in err


def test_cli_bad_sampling_value(capsys, tiny):
    rc = main(["generate", "Hello", "--model", str(tiny.path), "--top-p", "0"])
    assert rc == 2
    assert "top_p" in capsys.readouterr().err
