"""Streaming with stop strings: no piece may carry the stop string or what follows it, even when
the stop string arrives whole in one round (several tokens at once, as speculative rounds do)."""

import pytest

from veridraft.generate import _TextStream
from veridraft.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(real_model_dir):
    return Tokenizer.from_folder(real_model_dir("smollm2-135m"))


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_stream_never_sends_the_stop_string(tok, rounds):
    ids = tok.encode("The list is: apples, pears, plums, cherries")
    stop = "plums"
    pieces: list[str] = []
    out = _TextStream(tok, [stop], pieces.append)
    cut = out.stop_point(ids)
    kept = ids[:cut]
    step = max(1, len(kept) // rounds)
    for i in range(0, len(kept), step):  # commit the ids in a few multi-token rounds
        out.push(kept[i : i + step])
    text, reason = out.final(kept)
    out.flush(text)
    assert reason == "stop"
    assert text == "The list is: apples, pears, "
    assert "".join(pieces) == text
