"""The EAGLE-3 head drafter on a catalog model: greedy output bitwise plain decoding's, in the
reference mode and in a packed mode (q4a8, or q4 on CPUs without AVX512-VNNI), where the head's
features come back from the fused C++ forward.

The head is trained here for a few seconds on the target's own answer to the prompt (an
over-fitted head: it must draft tokens the target accepts, so that the check covers accepted
drafts, tree paths and the features of accepted rows, not only rejections).
"""

from __future__ import annotations

import pytest
import torch
from drafting_helpers import dev_questions, prompt_ids

from veridraft.decode import decode
from veridraft.drafters import make_drafter
from veridraft.drafters.eagle import default_aux_ids, save_head
from veridraft.models import kernels
from veridraft.sampling import SamplingParams
from veridraft.train.features import target_features
from veridraft.train.trainer import TrainConfig, train

PACKED = "q4a8" if kernels.isa() == "avx512bf16" else "q4"
NEW_TOKENS = 48
QUESTIONS = dev_questions({"summarization": 1, "qa": 1})


@pytest.fixture(scope="module")
def smollm2_packed(real_model_dir):
    from veridraft.loader import load

    real_model_dir("smollm2-135m")
    return load("smollm2-135m", precision=PACKED)


@pytest.fixture(scope="module")
def head_dir(smollm2_packed, tmp_path_factory):
    """A head over-fitted to the target's own answers to QUESTIONS (4,096-token draft vocab)."""
    model = smollm2_packed
    net = model.net
    aux_ids = default_aux_ids(net.config.n_layers)
    layers = tuple(i - 1 for i in aux_ids)
    samples = []
    for q in QUESTIONS:
        prompt = prompt_ids(model, q, max_tokens=120)
        new, _ = decode(
            net,
            prompt,
            max_new_tokens=NEW_TOKENS,
            sampling=SamplingParams(),
            generator=torch.Generator(),
        )
        ids = prompt + new
        mask = [s >= len(prompt) - 1 and s < len(ids) - 1 for s in range(len(ids))]
        samples.append(target_features(net, ids, layers, mask))
    samples.append(samples[0])  # the held-back slice: a copy (the head only has to fit)
    cfg = TrainConfig(
        steps=3, epochs=40, lr=2e-3, batch=2, holdout=0.34, draft_vocab=4096, intermediate_size=256
    )
    head, rep = train(net, samples, cfg, aux_ids=aux_ids, log=lambda s: None)
    assert rep.held[-1][1] > 0.3, rep.held[-1]  # it learned the answers
    out = tmp_path_factory.mktemp("head") / "eagle-own"
    save_head(head, out)
    return out


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("mode", ["chain", "tree"])
@pytest.mark.parametrize("precision", [PACKED, "fp32"])
def test_greedy_equals_plain_with_a_trained_head(
    smollm2_packed, real_model, plain_greedy, head_dir, precision, mode
):
    model = smollm2_packed if precision == PACKED else real_model("smollm2-135m")
    drafter = make_drafter(f"eagle:head={head_dir},mode={mode},k=4", model)
    drafted = accepted = rounds = 0
    for q in QUESTIONS:
        prompt = prompt_ids(model, q, max_tokens=120)
        ref = plain_greedy(model, prompt, NEW_TOKENS)
        out, stats = decode(
            model.net,
            prompt,
            max_new_tokens=NEW_TOKENS,
            sampling=SamplingParams(),
            generator=torch.Generator(),
            drafter=drafter,
        )
        assert out == ref, f"eagle {mode} on smollm2-135m {precision}, {q['category']}"
        drafted += stats.drafted
        accepted += stats.accepted
        rounds += len(out) - stats.accepted  # each round emits its accepted drafts + one
    # the head knows these answers: its drafts are kept (measured: 0.85-2.6 accepted tokens
    # per verification round across the modes)
    assert drafted > 0 and accepted > 0.5 * rounds, (accepted, rounds, drafted)
