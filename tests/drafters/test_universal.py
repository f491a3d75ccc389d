"""Universal (cross-tokenizer) drafting, lossless both ways.

Tiny pair: two random Llamas whose tokenizers differ (a SentencePiece-style BPE for the target,
a GPT-2 byte-level BPE for the draft, over the same small alphabet), so that every round goes
through text: the joint distribution of the first 3 sampled tokens fits the exact one (the
chi-square test of test_lossless.py), and greedy output equals plain decoding's. Real pair:
target gemma3-270m, draft smollm2-135m (and the reverse, a chat-templated target): greedy output
ids equal plain decoding's on Spec-Bench dev prompts.
"""

from __future__ import annotations

import pytest
import torch
from drafting_helpers import (
    ACCEPT_P,
    SAMPLING,
    chi2_pvalue,
    dev_questions,
    exact_joint,
    prompt_ids,
    sample_first,
    tiny_llama,
)
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from veridraft.decode import decode
from veridraft.drafters import UniversalDrafter, make_drafter
from veridraft.drafters.universal import _complete_end
from veridraft.errors import VeridraftError
from veridraft.sampling import SamplingParams
from veridraft.tokenizer import Tokenizer

GREEDY = SamplingParams()
N_TOKENS = 3

# ------------------------------------------------------------------ a tiny pair of tokenizers

_T_MERGES = [
    ("a", "b"),
    ("b", "a"),
    ("▁", "a"),
    ("▁", "b"),
    ("▁", "c"),
    ("c", "a"),
    ("b", "c"),
    ("a", "a"),
    ("▁a", "b"),
    ("c", "ab"),
    ("ab", "c"),
    ("▁", "▁"),
]
_D_MERGES = [
    ("Ġ", "a"),
    ("Ġ", "b"),
    ("Ġ", "c"),
    ("a", "b"),
    ("b", "b"),
    ("c", "c"),
    ("a", "c"),
    ("Ġa", "b"),
    ("b", "a"),
    ("c", "a"),
]


def _bpe_vocab(base: list[str], merges: list[tuple[str, str]]) -> dict[str, int]:
    vocab = {t: i for i, t in enumerate(base)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab


def target_tokenizer() -> Tokenizer:
    """SentencePiece style: spaces are '▁', no dummy prefix; 16 tokens."""
    vocab = _bpe_vocab(["▁", "a", "b", "c"], _T_MERGES)
    bk = HFTokenizer(models.BPE(vocab=vocab, merges=_T_MERGES))
    bk.normalizer = normalizers.Replace(" ", "▁")
    bk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    assert bk.get_vocab_size() == 16
    return Tokenizer(bk, name="tiny-sp")


def draft_tokenizer() -> Tokenizer:
    """GPT-2 byte level; 14 tokens + one special end token (which ends a draft)."""
    vocab = _bpe_vocab(["Ġ", "a", "b", "c"], _D_MERGES)
    bk = HFTokenizer(models.BPE(vocab=vocab, merges=_D_MERGES))
    bk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bk.decoder = decoders.ByteLevel()
    bk.add_special_tokens(["<end>"])
    assert bk.get_vocab_size() == 15
    return Tokenizer(bk, eos_ids=[14], name="tiny-bytelevel")


PROMPT_TEXT = "ab ca bc a b cab a"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ttok, dtok = target_tokenizer(), draft_tokenizer()
    target = tiny_llama(tmp_path_factory.mktemp("t"), seed=0, vocab=16)
    draft = tiny_llama(tmp_path_factory.mktemp("d"), seed=3, layers=2, vocab=15)
    prompt = ttok.encode(PROMPT_TEXT, add_special_tokens=False)
    assert ttok.decode(prompt) == PROMPT_TEXT
    assert dtok.decode(dtok.encode(PROMPT_TEXT)) == PROMPT_TEXT
    joint = exact_joint(target, prompt, N_TOKENS, SAMPLING)
    return target, draft, ttok, dtok, prompt, joint


def _universal(pair, **kw):
    target, draft, ttok, dtok, *_ = pair
    return UniversalDrafter(draft, dtok, ttok, **kw)


VARIANTS = {
    "dtw": {"mode": "fixed"},
    "lcd": {"align": "lcd", "mode": "fixed"},
    "dtw-k6-band1": {"num_tokens": 6, "window": 1},
    "dynamic": {"mode": "dynamic", "num_tokens": 6},
    "auto": {"mode": "auto", "num_tokens": 6},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sampling_distribution_matches_exact(pair, variant):
    target, _, _, _, prompt, joint = pair
    drafter = _universal(pair, **VARIANTS[variant])
    counts = sample_first(target, prompt, drafter, 1500, N_TOKENS, SAMPLING, seed=1)
    assert chi2_pvalue(counts, joint) > ACCEPT_P


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_equals_plain_on_tiny_pair(pair, variant):
    target, _, ttok, _, prompt, _ = pair
    ref, _ = decode(target, prompt, max_new_tokens=60, sampling=GREEDY, generator=torch.Generator())
    drafter = _universal(pair, **VARIANTS[variant])
    out, stats = decode(
        target,
        prompt,
        max_new_tokens=60,
        sampling=GREEDY,
        generator=torch.Generator(),
        drafter=drafter,
        tokenizer=ttok,
    )
    assert out == ref
    assert stats.new_tokens == 60


@pytest.mark.parametrize("sampling", [SAMPLING, GREEDY], ids=["sampling", "greedy"])
def test_drafts_are_proposed_accepted_and_rejected(pair, sampling):
    """The tests above must exercise acceptance, rejection, the re-encoding boundary cases and
    the alignment (not empty drafts)."""
    target, _, ttok, _, prompt, _ = pair
    drafter = _universal(pair, num_tokens=5)
    _, stats = decode(
        target,
        prompt,
        max_new_tokens=80,
        sampling=sampling,
        generator=torch.Generator().manual_seed(0),
        drafter=drafter,
        tokenizer=ttok,
    )
    assert stats.drafted > 0
    assert 0 < stats.accepted < stats.drafted
    assert drafter.prof["align_calls"] > 0


def test_same_vocabulary_identity_and_text_paths(pair):
    """A draft with the target's tokenizer: ids pass straight through (like `model`), or go
    through text with text=true; both greedy-exact."""
    target, _, ttok, _, prompt, _ = pair
    small = tiny_llama_like_target(pair)
    ref, _ = decode(target, prompt, max_new_tokens=40, sampling=GREEDY, generator=torch.Generator())
    for text in (False, True):
        d = UniversalDrafter(small, ttok, ttok, text=text, num_tokens=4)
        assert d.identity is (not text)
        out, stats = decode(
            target,
            prompt,
            max_new_tokens=40,
            sampling=GREEDY,
            generator=torch.Generator(),
            drafter=d,
            tokenizer=ttok,
        )
        assert out == ref
        assert stats.accepted > 0


def tiny_llama_like_target(pair):
    from veridraft.drafters.model import truncate_layers

    return truncate_layers(pair[0], 2)


def test_reencoding_across_the_boundary_and_rollback_bytes(pair):
    """The proposal is exactly the draft text in target tokens, also when the last committed
    target token would merge with the draft text."""
    target, draft, ttok, dtok, _, _ = pair
    d = _universal(pair)

    class Ctx:
        pass

    for committed, drafted in [("ab ca", " bc a"), ("ab c", "ab b"), ("a", "a b"), ("b ", " a")]:
        ctx = Ctx()
        ctx.ids = ttok.encode(committed, add_special_tokens=False)
        d._reset()
        d._consume_target(ctx.ids)
        xs = dtok.encode(drafted, add_special_tokens=False)
        props, x_ends, p_ends, exact = d._to_target(ctx, xs, 16)
        assert exact
        assert ttok.decode(props) == drafted, (committed, drafted)
        assert x_ends[-1] == p_ends[-1] == len(drafted.encode())


def test_complete_end():
    assert _complete_end(b"abc") == 3
    e = "日".encode()
    assert _complete_end(b"a" + e) == 4
    assert _complete_end(b"a" + e[:2]) == 1
    assert _complete_end(b"a" + e[:1]) == 1
    assert _complete_end(e[:2]) == 0
    assert _complete_end("🤖".encode()[:3]) == 0


def test_spec_errors(pair):
    target, *_ = pair
    with pytest.raises(VeridraftError, match="universal needs an argument"):
        make_drafter("universal", target)
    with pytest.raises(VeridraftError, match="align"):
        _universal(pair, align="nope")
    with pytest.raises(VeridraftError, match="unknown parameter"):
        make_drafter("universal:x:foo=1", target)


# ------------------------------------------------------------------ the real pair

REAL_Q = dev_questions({"summarization": 1, "translation": 1, "math_reasoning": 1})
NEW = 64  # gemma3-270m in fp32 reads ~1.2 GB per token: minutes per test on AVX2-only CPUs


def _check_greedy(plain_greedy, model, spec, questions, n):
    torch.set_num_threads(2)
    drafter = make_drafter(spec, model)
    drafted = accepted = 0
    for q in questions:
        prompt = prompt_ids(model, q)
        ref = plain_greedy(model, prompt, n)
        out, stats = decode(
            model.net,
            prompt,
            max_new_tokens=n,
            sampling=GREEDY,
            generator=torch.Generator(),
            drafter=drafter,
            eos_ids=model.tokenizer.eos_ids,
            tokenizer=model.tokenizer,
        )
        assert out == ref[: len(out)], f"{spec}, question {q['question_id']} ({q['category']})"
        assert len(out) == len(ref) or out[-1] in model.tokenizer.eos_ids
        drafted += stats.drafted
        accepted += stats.accepted
    assert drafted > 0 and accepted > 0
    return drafter


@pytest.mark.real
@pytest.mark.slow
def test_real_pair_greedy_equals_plain_dtw(real_model, plain_greedy):
    gemma = real_model("gemma3-270m")
    real_model("smollm2-135m")
    # fixed k drafts every round: the most rollbacks and alignments per token
    d = _check_greedy(plain_greedy, gemma, "universal:smollm2-135m:mode=fixed", REAL_Q, NEW)
    assert not d.identity


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        "universal:smollm2-135m:align=lcd",
        "universal:smollm2-135m:mode=dynamic",
        "universal:smollm2-135m",  # the default: cost-aware length
    ],
)
def test_real_pair_greedy_equals_plain_variants(real_model, plain_greedy, spec):
    gemma = real_model("gemma3-270m")
    _check_greedy(plain_greedy, gemma, spec, REAL_Q[:1], 64)


@pytest.mark.real
@pytest.mark.slow
def test_real_chat_target_with_a_base_draft(real_model, plain_greedy):
    """Target SmolLM2 (chat template: the draft reads its rendering as text), draft Gemma."""
    smol = real_model("smollm2-135m")
    real_model("gemma3-270m")
    _check_greedy(plain_greedy, smol, "universal:gemma3-270m", REAL_Q[:2], 64)


@pytest.mark.real
def test_real_same_vocabulary_is_identity(real_model, plain_greedy):
    smol = real_model("smollm2-135m")
    # The target drafting for itself: same tokenizer, so no text round trip, and (greedy, same
    # weights) nearly every draft token is accepted - a broken identity mapping would not be.
    d = _check_greedy(plain_greedy, smol, "universal:smollm2-135m:k=4", REAL_Q[:1], 32)
    assert d.identity
    assert d.name == "universal:smollm2-135m"


def test_default_length_is_cost_aware_unless_k_is_given(pair):
    assert _universal(pair).mode == "auto" and _universal(pair).auto is not None
    d = _universal(pair, num_tokens=3)
    assert (d.mode, d.num_tokens, d.auto) == ("fixed", 3, None)
