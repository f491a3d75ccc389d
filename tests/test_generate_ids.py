"""generate_ids(): ids in, ids out, the same loop generate() runs; and the warning a drafter
gets when its tuned profile or the cost model says it is slower than plain decoding here."""

import sys

import pytest
import torch

import veridraft
from veridraft import VeridraftError, generate_ids
from veridraft.cli import main
from veridraft.costmodel import CostModel, cost_paths, machine_id, save_cost
from veridraft.draft import Draft
from veridraft.generate import prefill_prompt
from veridraft.models.base import Skip
from veridraft.profiles import Profile, file_name, profiles_home, save_profile
from veridraft.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_smollm2_dir):
    return veridraft.load(tiny_smollm2_dir("tiny-llama-ids"), precision="fp32")


generate_mod = sys.modules["veridraft.generate"]  # the module; veridraft.generate is the function


@pytest.fixture(autouse=True)
def fresh_warnings(tmp_path, monkeypatch):
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path / "home"))
    generate_mod._WARNED.clear()


PROMPT = "The cat sat on the mat. The cat sat on the"


def test_generate_ids_is_what_generate_runs(tiny):
    ids = tiny.tokenizer.encode(PROMPT)
    gen = veridraft.generate(tiny, PROMPT, max_new_tokens=12)
    new, stats = generate_ids(tiny, ids, max_new_tokens=12)
    assert new == gen.ids and stats.new_tokens == len(new)
    drafted, st = generate_ids(tiny, ids, max_new_tokens=12, draft="ngram")
    assert drafted == new and st.method == "ngram"


def test_sampling_seed_generator_and_stop_rules(tiny):
    ids = tiny.tokenizer.encode(PROMPT)
    a, _ = generate_ids(tiny, ids, max_new_tokens=10, temperature=1.0, seed=3)
    b, _ = generate_ids(
        tiny,
        ids,
        max_new_tokens=10,
        sampling=SamplingParams(temperature=1.0),
        generator=torch.Generator().manual_seed(3),
    )
    assert a == b
    plain, _ = generate_ids(tiny, ids, max_new_tokens=10, eos_ids=())
    assert len(plain) == 10
    cut, _ = generate_ids(
        tiny,
        ids,
        max_new_tokens=10,
        eos_ids=(),
        should_stop=lambda new: 2 if len(new) > 3 else None,
    )
    assert cut == plain[:2]
    first, _ = generate_ids(tiny, ids, max_new_tokens=10, eos_ids={plain[0]})
    assert first == plain[:1]
    pf = prefill_prompt(tiny, ids, 10)
    again, _ = generate_ids(tiny, ids, max_new_tokens=10, eos_ids=(), prefilled=pf)
    assert again == plain


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(sampling=SamplingParams(), temperature=0.5), "either sampling="),
        (dict(seed=1, generator=torch.Generator()), "either seed="),
        (dict(max_new_tokens=0), "max_new_tokens must be"),
        (dict(max_new_tokens=1000), "exceeds the context length"),
        (dict(draft="nope"), "unknown drafter .nope.; valid: "),
    ],
)
def test_bad_arguments_say_what_to_fix(tiny, kw, msg):
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(VeridraftError, match=msg):
        generate_ids(tiny, [1, 2, 3], **kw)
    with pytest.raises(VeridraftError, match="prompt is empty"):
        generate_ids(tiny, [], max_new_tokens=4)


class Slow:
    name = "slow-one"
    expected_slowdown = "slow-one: measured x0.50 against plain decoding"

    def prefill(self, ctx):
        pass

    def propose(self, ctx, max_tokens):
        return Draft(tokens=[])

    def update(self, rnd):
        pass


def test_a_drafter_expected_to_lose_is_said_once_on_stderr_and_in_stats(tiny, capsys):
    ids = tiny.tokenizer.encode(PROMPT)
    _, st = generate_ids(tiny, ids, max_new_tokens=4, draft=Slow())
    _, st2 = generate_ids(tiny, ids, max_new_tokens=4, draft=Slow())
    err = capsys.readouterr().err
    assert err.count("veridraft: warning: slow-one: measured x0.50") == 1
    assert st.warnings == st2.warnings == [Slow.expected_slowdown]
    assert "warning: slow-one" in st.details()
    _, st3 = generate_ids(tiny, ids, max_new_tokens=4, draft="ngram")
    assert st3.warnings == [] and "warning" not in capsys.readouterr().err


def test_a_layerskip_profile_that_measured_a_slowdown_is_not_used_silently(tiny, tmp_path, capsys):
    prof = Profile(
        model=tiny.name,
        n_layers=2,
        precision="fp32",
        skip=Skip(attn=frozenset({1}), mlp=frozenset()),
        gamma=0.5,
        num_tokens=4,
        figures={"speedup": 0.81},
    )
    path = save_profile(prof, tmp_path / "layerskip.tiny.fp32.json")
    ids = tiny.tokenizer.encode(PROMPT)
    plain, _ = generate_ids(tiny, ids, max_new_tokens=8)
    new, st = generate_ids(tiny, ids, max_new_tokens=8, draft=f"layerskip:profile={path}")
    assert new == plain  # used as asked, still lossless
    assert any("x0.81 against plain decoding" in w for w in st.warnings)
    assert "x0.81 against plain decoding" in capsys.readouterr().err
    good = tmp_path / "good.json"
    prof.figures = {"speedup": 1.3}
    save_profile(prof, good)
    _, st = generate_ids(tiny, ids, max_new_tokens=8, draft=f"layerskip:profile={good}")
    assert st.warnings == []


def test_the_cost_model_warns_when_no_acceptance_repays_a_draft_step(tiny, capsys):
    from veridraft.drafters import make_drafter

    d = make_drafter("layerskip:attn=1", tiny)
    row = {t: 10.0 * (1 + 0.1 * (t - 1)) for t in (1, 2, 4, 8, 16)}
    cost = CostModel(
        model=tiny.name,
        precision="fp32",
        machine=machine_id(),
        threads=torch.get_num_threads(),
        forward_ms={100: row},
        draft_ms={"ngram": 0.01, d.cost_key: 30.0},  # a draft step of 3 target forwards
    )
    path = save_cost(tiny, cost)
    try:
        ids = tiny.tokenizer.encode(PROMPT)
        _, st = generate_ids(tiny, ids, max_new_tokens=6, draft="layerskip:attn=1")
        assert any("more than any acceptance rate can repay" in w for w in st.warnings)
        assert "can repay" in capsys.readouterr().err
        _, st = generate_ids(tiny, ids, max_new_tokens=6, draft="layerskip:attn=0")
        assert st.warnings == []  # another skip set: no figure, no claim
    finally:
        path.unlink()
    assert not cost_paths(tiny)[0].exists()


def _slow_profile(tiny, speedup: float) -> Profile:
    return Profile(
        model=tiny.name,
        n_layers=2,
        precision="fp32",
        skip=Skip(attn=frozenset({1}), mlp=frozenset()),
        gamma=0.5,
        num_tokens=4,
        figures={"speedup": speedup},
    )


def test_cli_reports_the_default_profile_slowdown_on_stderr_and_in_stats(tiny, capsys):
    save_profile(_slow_profile(tiny, 0.7), profiles_home() / file_name(tiny.name, "fp32"))
    argv = ["generate", "Hello", "--model", str(tiny.path), "-n", "4", "--draft", "layerskip"]
    assert main([*argv, "--stats"]) == 0
    err = capsys.readouterr().err
    assert "veridraft: warning: layerskip: the tuned profile" in err  # said when it starts
    assert "\nwarning: layerskip: the tuned profile" in err  # and in the --stats report
    assert main(argv) == 0
    assert "veridraft: warning" not in capsys.readouterr().err  # once per process


@pytest.mark.parametrize("draft", ["suffix", "recycle", "hybrid:ngram"])
def test_tree_drafters_without_a_cost_profile_are_flagged_on_long_prompts(
    tiny, draft, monkeypatch, capsys
):
    monkeypatch.setattr(generate_mod, "LONG_PROMPT", 8)  # the tiny model's context is short
    ids = tiny.tokenizer.encode(PROMPT)
    assert len(ids) >= 8
    _, st = generate_ids(tiny, ids, max_new_tokens=4, draft=draft)
    assert any("no cost profile sizes its token trees" in w for w in st.warnings)
    assert any("--contexts 100,1000,1k" in w for w in st.warnings)
    assert "veridraft: warning:" in capsys.readouterr().err


def test_no_long_prompt_flag_when_something_sizes_the_trees(tiny, monkeypatch):
    monkeypatch.setattr(generate_mod, "LONG_PROMPT", 8)
    ids = tiny.tokenizer.encode(PROMPT)
    for draft in ("suffix:nodes=4", "recycle:nodes=4", "ngram"):  # nodes= given; no trees
        _, st = generate_ids(tiny, ids, max_new_tokens=4, draft=draft)
        assert not st.warnings, (draft, st.warnings)
    _, st = generate_ids(tiny, ids[:6], max_new_tokens=4, draft="suffix")  # a short prompt
    assert not st.warnings
    cost = CostModel(
        model=tiny.name,
        precision="fp32",
        machine=machine_id(),
        threads=torch.get_num_threads(),
        forward_ms={100: {1: 1.0, 2: 1.1, 4: 1.3, 8: 1.8}},
        draft_ms={},
    )
    path = save_cost(tiny, cost)
    try:
        _, st = generate_ids(tiny, ids, max_new_tokens=4, draft="suffix")  # a profile sizes them
        assert not st.warnings
    finally:
        path.unlink()
