"""precision="auto" and draft="auto": what they choose on each kind of CPU and cost profile, that
they say so, and that the automatic drafter keeps plain decoding's output."""

from types import SimpleNamespace

import pytest
import torch

import veridraft
from veridraft import auto, generate_ids
from veridraft.costmodel import CostModel, cost_paths, machine_id
from veridraft.models import kernels

AVX512 = {"avx512_bf16", "avx512_vnni", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}
AVX2 = {"avx2", "fma", "f16c"}


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """Set the CPU's flags the choice reads (and an empty VERIDRAFT_HOME: no profiles)."""
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VERIDRAFT_ISA", raising=False)

    def use(flags: set[str]) -> None:
        monkeypatch.setattr(kernels, "_cpu_flags", lambda: set(flags))

    return use


@pytest.mark.parametrize(
    "flags, gguf, expect",
    [
        (AVX512, True, "q4a8"),
        (AVX512 | {"amx_bf16"}, True, "q4a8"),
        (AVX2, True, "q4"),
        (AVX512 | {"amx_bf16"}, False, "bf16"),
        (AVX512, False, "fp16w"),
        (AVX2, False, "fp32"),
        (set(), True, "fp32"),
    ],
)
def test_precision_by_instruction_set(cpu, tmp_path, flags, gguf, expect):
    cpu(flags)
    choice = auto.pick_precision(tmp_path, "m", has_gguf=gguf)
    assert choice.value == expect and choice.why


def _profile(precision: str, one: float, eight: float | None = None) -> CostModel:
    eight = one * 1.1 if eight is None else eight
    return CostModel(
        model="m",
        precision=precision,
        machine=machine_id(),
        threads=torch.get_num_threads(),
        forward_ms={100: {1: one, 8: eight}},
    )


def test_measured_profiles_override_the_table(cpu, tmp_path):
    cpu(AVX512)
    where = SimpleNamespace(name="m", path=tmp_path)
    for precision, ms in (("q4a8", 30.0), ("bf16", 20.0), ("fp32", 25.0)):
        _profile(precision, ms).save(cost_paths(where, precision)[0])
    choice = auto.pick_precision(tmp_path, "m", has_gguf=True)
    assert choice.value == "bf16" and "measured" in choice.why
    # a mode this model cannot run (no GGUF) is never chosen, however fast it measured
    _profile("q4", 1.0).save(cost_paths(where, "q4")[0])
    assert auto.pick_precision(tmp_path, "m", has_gguf=False).value == "bf16"
    assert auto.pick_precision(tmp_path, "m", has_gguf=True).value == "q4"


def test_draft_choice_follows_the_mode_and_the_prompt():
    q4a8 = SimpleNamespace(name="m", precision="q4a8")
    assert auto.pick_draft(q4a8, 100).value == "suffix"
    assert auto.pick_draft(q4a8, 100, chain_only=True).value == "ngram"
    long = auto.pick_draft(q4a8, 8000)
    assert long.value is None and "veridraft profile --model m --precision q4a8" in long.why
    for mode in ("fp32", "fp16w"):
        assert auto.pick_draft(SimpleNamespace(precision=mode), 100).value is None


def test_draft_choice_follows_a_measured_profile():
    model = SimpleNamespace(name="m", precision="fp32")
    flat = _profile("fp32", 10.0, 12.0)
    steep = _profile("fp32", 10.0, 25.0)
    assert auto.pick_draft(model, 100, flat).value == "suffix"  # measured flat, even in fp32
    no = auto.pick_draft(model, 100, steep)
    assert no.value is None and "2.50x" in no.why


@pytest.fixture(scope="module")
def tiny_folder(tiny_smollm2_dir):
    return tiny_smollm2_dir("tiny-llama-auto")


def test_auto_load_says_what_it_chose(tiny_folder, monkeypatch):
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: set(AVX2))
    m = veridraft.load(tiny_folder)  # no GGUF, AVX2 only: the reference mode
    assert m.precision == "fp32" and m.chosen.startswith("auto precision: fp32")
    gen = veridraft.generate(m, "The cat sat on the mat.", max_new_tokens=4)
    assert gen.stats.notes[0] == m.chosen
    assert gen.stats.notes[1].startswith("auto draft: none (plain decoding)")
    assert veridraft.load(tiny_folder, precision="fp32").chosen == ""


def test_auto_draft_is_lossless(tiny_folder):
    m = veridraft.load(tiny_folder, precision="bf16")  # a flat mode: auto drafts
    ids = m.tokenizer.encode("one two three four one two three four one two three")
    plain, _ = generate_ids(m, ids, max_new_tokens=24, draft=None)
    for draft in ("none", "ar"):
        assert generate_ids(m, ids, max_new_tokens=24, draft=draft)[0] == plain
    new, stats = generate_ids(m, ids, max_new_tokens=24, draft="auto")
    assert new == plain
    assert stats.method.startswith("suffix") and stats.notes[0].startswith("auto draft: suffix")
    with pytest.raises(veridraft.VeridraftError, match="draft='auto' takes no drafter options"):
        generate_ids(m, ids, max_new_tokens=4, draft="auto", num_tokens=3)


def test_sampling_leaves_the_global_rng_alone(tiny_folder):
    m = veridraft.load(tiny_folder, precision="fp32")
    ids = m.tokenizer.encode("The cat")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_ids(m, ids, max_new_tokens=3, temperature=0.8)  # no seed: a fresh one is drawn
    assert torch.equal(torch.rand(3), expected)
