"""`veridraft tune layerskip` end to end on a tiny llama (real smollm2 tokenizer, random
weights): the search runs with a small budget, writes a valid profile and a trials file, resumes
from that file, and `draft="layerskip"` then loads the profile."""

import json

import pytest

import veridraft
from veridraft import VeridraftError
from veridraft.cli import main
from veridraft.profiles import file_name, load_profile
from veridraft.tune import Config, Space, calibration_questions, probe_configs, tune_layerskip


@pytest.fixture(scope="module")
def tiny(tiny_smollm2_dir):
    return veridraft.load(
        tiny_smollm2_dir("tiny-llama-tune", layers=4, positions=512), precision="fp32"
    )


@pytest.fixture
def calib(tmp_path):
    rows = [
        {"question_id": 1, "category": "summarization", "turns": ["Summarize: the cat sat."]},
        {"question_id": 2, "category": "summarization", "turns": ["Summarize: rain fell all day."]},
        {"question_id": 3, "category": "qa", "turns": ["What is the capital of France?"]},
        {"question_id": 4, "category": "writing", "turns": ["Write a haiku about the sea."]},
    ]
    p = tmp_path / "calib.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture
def home(tmp_path, monkeypatch, real_model_dir):
    real_model_dir("smollm2-135m")  # pulled before $VERIDRAFT_HOME moves
    h = tmp_path / "home"
    monkeypatch.setenv("VERIDRAFT_HOME", str(h))
    return h


def test_calibration_mix(calib):
    _, qs = calibration_questions(calib, 3)
    groups = [q.group for q in qs]
    assert groups.count("summarization") == 2 and len(set(q.question_id for q in qs)) == 3
    with pytest.raises(VeridraftError, match="only 4 usable"):
        calibration_questions(calib, 9)


def test_space_threshold_and_encoding():
    sp = Space(4, search_exit=True)
    x = {k: 0.2 for k in sp.bounds()}
    x.update({sp.attn_keys[1]: 0.51, sp.mlp_keys[3]: 0.9, "gamma0": 0.7, "num_tokens": 5.4})
    c = sp.decode(x)
    assert (c.attn, c.mlp, c.gamma, c.num_tokens) == ((1,), (3,), 0.7, 5)
    assert sp.decode(sp.encode(c)) == c
    assert not sp.valid(Config((0, 1, 2, 3), (0, 1, 2, 3)))
    assert "gamma0" not in Space(4, search_exit=False).bounds()


def test_probes_include_the_default(tiny):
    from veridraft.drafters.layerskip import heuristic_skip

    ps = probe_configs(tiny)
    assert ps[0].skip == heuristic_skip(4)
    assert len({p.key() for p in ps}) == len(ps)
    assert all(p.attn or p.mlp for p in ps)


def test_search_end_to_end_resume_and_default_load(tiny, calib, home):
    out = home / "profiles" / file_name(tiny.name, "fp32")
    kw = dict(
        calib=calib,
        prompts=2,
        max_new_tokens=8,
        out=out,
        threads=1,
        baseline_prompts=1,
        final_top=2,
        final_rounds=1,
        progress=False,
        log=lambda s: None,
    )
    res = tune_layerskip(tiny, iters=6, search_exit=True, command="test", **kw)
    assert res.path == out and out.is_file()
    prof = load_profile(out)
    assert prof.model == tiny.name and prof.precision == "fp32" and prof.n_layers == 4
    assert prof.skip.attn or prof.skip.mlp
    assert 0 <= prof.gamma <= 1 and 1 <= prof.num_tokens <= 16
    assert prof.figures["speedup"] > 0 and prof.figures["hand_picked_speedup"] > 0
    assert prof.machine["threads"] == 1 and prof.machine["cpu"]
    assert prof.command == "test" and prof.date
    rows = [json.loads(line) for line in res.trials_path.read_text().splitlines()]
    assert rows[0]["kind"] == "header"
    trials = [r for r in rows if r["kind"] == "trial"]
    assert len(trials) == 6
    assert {t["source"] for t in trials} & {"probe"}
    assert all(t["exact"] for t in trials), "self-speculation must reproduce plain decoding"

    # resume: the 6 trials are re-registered, only 2 more run
    res2 = tune_layerskip(tiny, iters=8, search_exit=True, command="test", **kw)
    trials2 = [
        json.loads(line)
        for line in res2.trials_path.read_text().splitlines()
        if json.loads(line)["kind"] == "trial"
    ]
    assert len(trials2) == 8 and [t["trial"] for t in trials2] == list(range(8))
    assert trials2[:6] == trials

    # a different search may not append to these trials
    with pytest.raises(VeridraftError, match="another search"):
        tune_layerskip(tiny, iters=8, search_exit=False, **kw)

    # draft="layerskip" now uses the profile ($VERIDRAFT_HOME first)
    from veridraft.drafters import make_drafter

    d = make_drafter("layerskip", tiny)
    prof2 = load_profile(out)
    assert d.skip == prof2.skip and d.num_tokens == prof2.num_tokens
    assert d.gamma == pytest.approx(prof2.gamma)
    assert make_drafter("layerskip:gamma=0.9", tiny).gamma == 0.9  # options still win
    with pytest.warns(UserWarning, match="no measured skip set"):
        plain = make_drafter("layerskip:profile=none", tiny)
    from veridraft.drafters.layerskip import heuristic_skip

    assert plain.skip == heuristic_skip(4) and plain.gamma == 0.6
    g = veridraft.generate(tiny, "Hello there", max_new_tokens=12, draft="layerskip")
    assert g.ids == veridraft.generate(tiny, "Hello there", max_new_tokens=12).ids


def test_cli_runs_a_small_search(tiny, calib, home, capsys):
    out = home / "p.json"
    rc = main(
        [
            "tune",
            "layerskip",
            "--model",
            str(tiny.path),
            "--calib",
            str(calib),
            "--prompts",
            "2",
            "--max-new-tokens",
            "6",
            "--iters",
            "3",
            "--baseline-prompts",
            "1",
            "--final-top",
            "1",
            "--final-rounds",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(out)
    prof = load_profile(out)
    # The command that reproduces the run, from the arguments main() was given (not sys.argv,
    # which is pytest's here); defaults are left out, paths are stored portable.
    words = prof.command.split()
    assert words[:5] == ["veridraft", "tune", "layerskip", "--model", words[4]]
    assert words[4].endswith(tiny.path.name)
    for option in ("--prompts 2", "--max-new-tokens 6", "--iters 3", "--final-top 1"):
        assert f" {option} " in f" {prof.command} "
    assert words[-1] == "--no-progress" and "--seed" not in words
    assert (home / "p.trials.jsonl").is_file()


def test_bad_arguments(tiny, calib, home):
    with pytest.raises(VeridraftError, match="iters"):
        tune_layerskip(tiny, calib=calib, iters=0, progress=False)
    assert main(["tune", "layerskip", "--prompts", "2", "--baseline-prompts", "3"]) == 2
