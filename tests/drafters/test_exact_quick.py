"""The fast tier's exact-match check: every drafter kind, on a catalog model, one Spec-Bench
question and a short answer, gives plain decoding's greedy ids. The long checks (more questions,
longer answers, both models, every variant) are in test_lossless.py, test_universal.py and
models/test_precision.py, marked slow."""

from __future__ import annotations

import pytest
import torch
from drafting_helpers import dev_questions, prompt_ids

from veridraft.decode import decode
from veridraft.drafters import make_drafter
from veridraft.sampling import SamplingParams

QUESTION = dev_questions({"summarization": 1})[0]  # long prompt: prompt lookup has matches
NEW_TOKENS = 32


@pytest.mark.real
@pytest.mark.filterwarnings("ignore:layerskip")
@pytest.mark.parametrize(
    "target, spec",
    [
        ("smollm2-135m", "ngram"),
        ("smollm2-135m", "layerskip"),
        ("smollm2-135m", "model:smollm2-135m-l8"),
        ("gemma3-270m", "universal:smollm2-135m:mode=fixed"),
        ("smollm2-135m", "recycle"),
        ("smollm2-135m", "suffix"),
    ],
)
def test_greedy_equals_plain_short(real_model, plain_greedy, target, spec):
    model = real_model(target)
    drafter = make_drafter(spec, model)
    prompt = prompt_ids(model, QUESTION)
    out, stats = decode(
        model.net,
        prompt,
        max_new_tokens=NEW_TOKENS,
        sampling=SamplingParams(),
        generator=torch.Generator(),
        drafter=drafter,
    )
    assert out == plain_greedy(model, prompt, NEW_TOKENS), spec
    assert stats.drafted > 0, f"{spec} never drafted: the check would not test it"
