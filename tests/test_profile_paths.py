"""A saved profile carries no absolute path of the machine that wrote it: file names in its
search record and its command are stored relative to the working directory, or as bare names."""

import json

from veridraft.models.base import Skip
from veridraft.profiles import Profile, portable_path, save_profile


def test_portable_path(tmp_path):
    inside = tmp_path / "logs" / "a.trials.jsonl"
    assert portable_path(str(inside), base=tmp_path) == "logs/a.trials.jsonl"
    assert portable_path("/elsewhere/data/q.jsonl", base=tmp_path) == "q.jsonl"
    assert portable_path("docs/q.jsonl", base=tmp_path) == "docs/q.jsonl"  # already relative


def test_saved_profile_has_no_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prof = Profile(
        model="toy",
        n_layers=4,
        precision="fp32",
        skip=Skip(attn=frozenset({1}), mlp=frozenset()),
        gamma=0.6,
        num_tokens=8,
        search={
            "questions_file": "/srv/data/spec_bench_dev.jsonl",
            "trials_file": str(tmp_path / "out" / "p.trials.jsonl"),
            "trials": 3,
        },
        command=f"veridraft tune layerskip --model toy --out {tmp_path}/out/p.json",
    )
    out = save_profile(prof, tmp_path / "out" / "p.json")
    d = json.loads(out.read_text(encoding="utf-8"))
    assert d["search"] == {
        "questions_file": "spec_bench_dev.jsonl",
        "trials_file": "out/p.trials.jsonl",
        "trials": 3,
    }
    assert d["command"] == "veridraft tune layerskip --model toy --out out/p.json"
    assert str(tmp_path) not in out.read_text(encoding="utf-8")
