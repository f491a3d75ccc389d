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
        methods="ar,ngram,pruned,kv=snapkv:budget=0.25",
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
    assert "RANDOM WEIGHTS" in capsys.readouterr().out
