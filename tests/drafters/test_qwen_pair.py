"""The real target/draft pair: qwen2.5-coder-1.5b drafted by qwen2.5-coder-0.5b (same tokenizer)
and by smollm2-135m (another tokenizer), greedy, in q4 (the fastest mode on every CPU measured,
and the one the pair's benchmarks use; lossless means equal to plain decoding in the same
mode)."""

from __future__ import annotations

import pytest
import torch

from veridraft.decode import decode
from veridraft.drafters import make_drafter
from veridraft.sampling import SamplingParams

pytestmark = [pytest.mark.real, pytest.mark.slow]

NEW_TOKENS = 24
PROMPT = "Write a Python function that returns the n-th Fibonacci number."


@pytest.fixture(scope="module")
def target():
    from veridraft.loader import load

    return load("qwen2.5-coder-1.5b", precision="q4")


def _decode(model, ids, drafter=None):
    return decode(
        model.net,
        ids,
        max_new_tokens=NEW_TOKENS,
        sampling=SamplingParams(),
        generator=torch.Generator(),
        drafter=drafter,
    )


@pytest.fixture(scope="module")
def plain(target):
    ids = target.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    out, _ = _decode(target, ids)
    assert len(out) == NEW_TOKENS
    return ids, out


@pytest.mark.parametrize("draft", ["model:qwen2.5-coder-0.5b", "universal:smollm2-135m"])
def test_greedy_drafted_equals_plain_on_the_qwen_pair(target, plain, draft):
    ids, ref = plain
    out, stats = _decode(target, ids, make_drafter(draft, target))
    assert out == ref, (
        f"{draft}: {target.tokenizer.decode(out)!r} vs {target.tokenizer.decode(ref)!r}"
    )
    assert stats.drafted > 0 and stats.accepted > 0
