"""`veridraft bench --suite video` on a random-weight model: every report says the weights are
random, lossless methods are exact, presses report their KV memory and fidelity."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from veridraft.bench.video import RANDOM_NOTE, run_video_suite


@pytest.mark.slow
def test_video_suite_on_random_weights(real_model_dir, sample_video, tmp_path, capsys):
    real_model_dir("qwen2.5-coder-0.5b")  # the tokenizer the random model borrows
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(sample_video, videos / sample_video.name)
    args = SimpleNamespace(
        model="random:tiny",
        precision="fp32",
        threads=0,
        seed=0,
        methods="ar,ngram,pruned,ngram+loose:topk=5,kv=snapkv:budget=0.25",
        questions=str(videos),
        limit=None,
        max_new_tokens=8,
        out=str(tmp_path / "out"),
    )
    assert run_video_suite(args) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["random_weights"] and results["note"] == RANDOM_NOTE
    assert report.count(RANDOM_NOTE) == 2 and "(random weights)" in report
    (video,) = results["videos"]
    assert video["visual_tokens"] > 500  # the reference processor's defaults on a real clip
    rows = {r["method"]: r for r in video["rows"]}
    assert rows["ngram"]["exact"] and rows["pruned"]["exact"]
    press = rows["kv=snapkv:budget=0.25"]
    assert press["exact"] is None and "KV memory held" in press["notes"][0]
    loose = rows["ngram+loose:topk=5"]  # lossy: compared by fidelity, never called exact
    assert loose["exact"] is None and 0.0 <= loose["fidelity"] <= 1.0 and loose["drafted"] > 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().out


def test_method_specs_are_checked_before_the_run():
    from veridraft.bench.video import check_methods
    from veridraft.errors import VeridraftError

    # the long run must not start when one spec cannot: a press without its budget, a typo
    with pytest.raises(VeridraftError, match="hybridkv needs a budget"):
        check_methods(["ar", "ngram", "kv=hybridkv"])
    with pytest.raises(VeridraftError, match="ngarm"):
        check_methods(["ar", "ngarm"])
    with pytest.raises(VeridraftError, match="topx"):
        check_methods(["ar", "ngram+loose:topx=5"])
    # control: the same methods, well formed, pass
    check_methods(
        [
            "ar",
            "ngram",
            "pruned",
            "ngram+loose:topk=5",
            "kv=hybridkv:budget=0.25",
            "kv=mm-shiftkv:budget=0.25",
        ]
    )


def test_a_failed_method_fails_its_row_in_the_report():
    from veridraft.bench.video import VideoRow, video_report

    ok = VideoRow(method="ar", ids=[1, 2], exact=None, fidelity=1.0, rounds=2, kv_bytes=2**20)
    bad = VideoRow(method="kv=x", ids=[], exact=None, fidelity=0.0, error="x is not a press")
    video = dict(
        video="v.mp4",
        grid_thw=[2, 4, 4],
        frames=4,
        visual_tokens=8,
        prompt_tokens=20,
        prepare_s=0.1,
        rows=[ok.__dict__, bad.__dict__],
    )
    results = dict(
        model="random:tiny",
        precision="fp32",
        cpu="cpu",
        load="0.0",
        max_new_tokens=2,
        videos=[video],
    )
    report = video_report(results)
    assert "| kv=x | failed: x is not a press |" in report
    assert "| ar | lossy | 1.00 |" in report
