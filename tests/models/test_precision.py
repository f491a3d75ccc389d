"""Precision modes (models/precision.py): batch invariance of the kernels, greedy exact match
between plain and speculative decoding *in the same mode*, and agreement with fp32.

fp32's own exact-match tests are tests/drafters/test_lossless.py; here every other mode runs the
same check with each drafter on smollm2-135m (and ngram on gemma3-270m).
"""

from __future__ import annotations

import json

import pytest
import torch

from veridraft.bench.questions import default_questions_path
from veridraft.decode import decode
from veridraft.drafters import make_drafter
from veridraft.errors import VeridraftError
from veridraft.models import kernels
from veridraft.models.precision import PRECISIONS, PackedLinear, agreement
from veridraft.sampling import SamplingParams

PACKED = [p for p in PRECISIONS if p != "fp32"]
# q4 and q4a8 are built from the GGUF (tests/models/test_q4.py has their kernel tests)
REAL = [
    *PACKED,
    "q4",
    pytest.param(
        "q4a8",
        marks=pytest.mark.skipif(
            kernels.isa() != "avx512bf16", reason="q4a8 needs AVX512-VNNI and AVX512-BF16"
        ),
    ),
]
DEV = default_questions_path()
NEW_TOKENS = 32
# Floors for agreement with fp32 (teacher-forced on fp32's greedy continuations of dev prompts).
# Measured (docs/precision.md): fp16w 100% argmax agreement on both models, max |logit diff|
# 0.026 (smollm2-135m) and 0.014 (gemma3-270m).
# The floors leave room for other prompts, models and machines.
# bf16 (activations rounded too): 97.5% on both (198 positions, 6 prompts), max |logit diff| 0.52
# (smollm2-135m) and 0.27 (gemma3-270m).
# q4 (the GGUF's blocks with bfloat16 scales, bf16 activations): 98.5% (smollm2-135m) and 100%
# (gemma3-270m) of 66 positions, max |logit diff| 0.37 and 0.36.
# q4a8 (the same blocks, activations as bytes per 32): 95.5% (smollm2-135m) and 98.5%
# (gemma3-270m) of 66 positions, max |logit diff| 1.15 and 0.84 (q4 on the same run: 98.5% / 0.24,
# 100% / 0.17).
FLOORS = {
    "fp16w": {"argmax_agreement": 0.97, "max_logit_diff": 1.0},
    "bf16": {"argmax_agreement": 0.93, "max_logit_diff": 2.0},
    "q4": {"argmax_agreement": 0.93, "max_logit_diff": 1.5},
    "q4a8": {"argmax_agreement": 0.9, "max_logit_diff": 2.5},
}
# Largest |packed - float32| of one linear on the kernel test's random inputs (|y| ~ 1).
KERNEL_TOL = {"fp16w": 5e-3, "bf16": 5e-2}


@pytest.fixture(scope="module")
def loaded():
    """(catalog name, precision) -> LoadedModel, once per module (fp32 from the session)."""
    from veridraft.loader import load

    cache: dict = {}

    def get(name: str, precision: str):
        if (name, precision) not in cache:
            cache[name, precision] = load(name, precision=precision)
        return cache[name, precision]

    return get


def _prompts(model, n: int) -> list[list[int]]:
    """The first question of n different Spec-Bench dev categories, trimmed to ~200 ids."""
    seen, out = set(), []
    tok = model.tokenizer
    for line in DEV.read_text().splitlines():
        row = json.loads(line)
        if row["category"] in seen:
            continue
        seen.add(row["category"])
        text = tok.decode(tok.encode(row["turns"][0], add_special_tokens=False)[:200])
        if tok.has_chat_template:
            out.append(tok.encode_chat([{"role": "user", "content": text}]))
        else:
            out.append(tok.encode(text))
        if len(out) == n:
            break
    return out


def _decode(net, ids, drafter=None):
    return decode(
        net,
        ids,
        max_new_tokens=NEW_TOKENS,
        sampling=SamplingParams(),
        generator=torch.Generator(),
        drafter=drafter,
    )


# ------------------------------------------------------------------ kernels


# 112: not a whole bf16 tile; (576, 1536): the down projection's shape, whose oneDNN kernel
# changes at 7-8 rows on AVX512-BF16 CPUs without AMX (PackedLinear._probe_row_floor)
@pytest.mark.parametrize("shape", [(960, 576), (256, 112), (576, 1536)])
@pytest.mark.parametrize("precision", PACKED)
def test_packed_rows_do_not_depend_on_the_other_rows(precision, shape):
    g = torch.Generator().manual_seed(0)
    n, k = shape

    def wild(*size):  # magnitudes 2^-8..2^8: sums cancel, so their order shows in the output
        return torch.randn(*size, generator=g) * torch.exp2(torch.randint(-8, 9, size, generator=g))

    w, b = wild(n, k) * 0.05, torch.randn(n, generator=g)
    lin = PackedLinear(w, b, precision)
    x = wild(16, k)
    one = torch.cat([lin(x[i : i + 1]) for i in range(16)])
    for m in (2, 3, 5, 7, 8, 12, 16):
        assert torch.equal(lin(x[:m]), one[:m]), m
    assert torch.equal(lin(x.flip(0)), one.flip(0))  # position in the batch does not matter
    w, x = torch.randn(n, k, generator=g) * 0.05, torch.randn(16, k, generator=g)
    err = (PackedLinear(w, b, precision)(x) - torch.nn.functional.linear(x, w, b)).abs().max()
    assert 0 < err < KERNEL_TOL[precision]  # 16-bit rounding: close, and not the fp32 kernel


@pytest.mark.parametrize("precision", PACKED)
def test_prefill_sized_rows_do_not_depend_on_the_chunking(precision):
    # a prompt in 1024-row chunks gives the rows of one 2100-row call (AMX oneDNN splits a
    # matmul between threads by its rows; precision.ROW_BLOCK); 1536x576 was measured to move
    g = torch.Generator().manual_seed(1)
    n, k = 1536, 576
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-8, 9, (n, k), generator=g))
    x = torch.randn(2100, k, generator=g) * torch.exp2(torch.randint(-8, 9, (2100, k), generator=g))
    lin = PackedLinear(w * 0.05, None, precision)
    whole = lin(x)
    assert torch.equal(whole, torch.cat([lin(x[:1024]), lin(x[1024:2048]), lin(x[2048:])]))


@pytest.mark.real
def test_unknown_precision_is_refused():
    from veridraft.loader import load

    with pytest.raises(VeridraftError, match="unknown precision 'int3'.*fp16w"):
        load("smollm2-135m", precision="int3")


# ------------------------------------------------------------------ real models


# q4 and q4a8 run their forwards of up to 64 rows through the fused C++ forward where it builds
# (models/fused.py): the row-invariance test runs on their Python path too.
PATHS = [*REAL, "q4:python", pytest.param("q4a8:python", marks=REAL[-1].marks)]


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
@pytest.mark.parametrize("precision", PATHS)
def test_a_forward_over_t_tokens_equals_t_one_token_forwards(loaded, precision, name):
    """What makes speculative decoding exact in a packed mode: the logits of a verification
    forward over T tokens are bitwise those of T one-token steps (T up to decode's 17)."""
    precision, _, path = precision.partition(":")
    net = loaded(name, precision).net
    keep = net.fused
    if path == "python":
        net.fused = None
    ids = torch.randint(100, 20000, (57,), generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            cache = net.new_cache(80)
            net(ids[:40], cache)
            steps = torch.cat([net(ids[40 + i : 41 + i], cache) for i in range(17)])
            for t in (2, 3, 5, 8, 12, 17):
                cache.truncate(40)
                out = net(ids[40 : 40 + t], cache)
                diff = float((out - steps[:t]).abs().max())
                assert torch.equal(out, steps[:t]), f"T={t}: {diff}"
    finally:
        net.fused = keep


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("draft", ["ngram", "layerskip", "model:smollm2-135m-l8:k=4,mode=fixed"])
@pytest.mark.parametrize("precision", REAL)
@pytest.mark.filterwarnings("ignore:layerskip")
def test_greedy_speculative_equals_plain_smollm2(loaded, plain_greedy, precision, draft):
    model = loaded("smollm2-135m", precision)
    drafter = make_drafter(draft, model)
    drafted = 0
    for ids in _prompts(model, 2):
        out, stats = _decode(model.net, ids, drafter)
        assert out == plain_greedy(model, ids, NEW_TOKENS), f"{draft} in {precision}"
        drafted += stats.drafted
    assert drafted > 0


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("precision", REAL)
def test_greedy_ngram_equals_plain_gemma3(loaded, plain_greedy, precision):
    model = loaded("gemma3-270m", precision)
    drafter = make_drafter("ngram", model)
    for ids in _prompts(model, 1):
        out, stats = _decode(model.net, ids, drafter)
        assert out == plain_greedy(model, ids, NEW_TOKENS)
        assert stats.drafted > 0


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("precision", REAL)
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_agreement_with_fp32(real_model, loaded, plain_greedy, name, precision):
    ref = real_model(name)
    model = loaded(name, precision)
    seqs, starts = [], []
    for ids in _prompts(ref, 2):
        seqs.append(ids + plain_greedy(ref, ids, NEW_TOKENS))
        starts.append(len(ids))
    got = agreement(ref.net, model.net, seqs, starts)
    print(name, precision, got)
    floor = FLOORS[precision]
    assert got["argmax_agreement"] >= floor["argmax_agreement"], got
    assert got["max_logit_diff"] <= floor["max_logit_diff"], got
    assert got["max_logit_diff"] > 0  # a packed mode is an approximation, not a copy


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("precision", PACKED)
def test_a_packed_folder_loads_one_float32_matrix_at_a_time(tmp_path, precision, tie):
    """from_folder packs each linear as it reads it from the checkpoint (meta linears until
    then): the same model, bit for bit, as packing a whole float32 model."""
    from drafting_helpers import tiny_llama
    from safetensors.torch import load_file

    from veridraft.models import from_folder, from_hf_config_and_state_dict
    from veridraft.models.base import read_json

    tiny_llama(tmp_path, seed=5, layers=2, vocab=64, tie=tie)
    streamed = from_folder(tmp_path, precision=precision)
    assert not any(p.is_meta for p in streamed.parameters())
    assert not any(b.is_meta for b in streamed.buffers())
    whole = from_hf_config_and_state_dict(
        read_json(tmp_path / "config.json"), load_file(tmp_path / "model.safetensors"), precision
    )
    ids = torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(streamed(ids, streamed.new_cache(16)), whole(ids, whole.new_cache(16)))
