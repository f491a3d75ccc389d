"""Feature storage: the corpora, shards that a stopped run continues from, the command."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from veridraft.errors import VeridraftError
from veridraft.train import features

pytestmark = pytest.mark.usefixtures("one_thread")


def _py_corpus(folder, n: int = 5):
    folder.mkdir()
    for i in range(n):
        body = textwrap.dedent(
            f'''
            def function_{i}(values, scale={i + 1}):
                """Scale every value by {i + 1} and keep the positive ones."""
                out = []
                for v in values:
                    if v * scale > 0:
                        out.append(v * scale)
                return out
            '''
        )
        (folder / f"mod{i}.py").write_text(body * 3)
    return folder


def test_corpora(tmp_path):
    std = features.find_corpus("stdlib")
    assert std.kind == "code" and len(std.items) > 100
    assert not any("/test/" in str(p) or "/tests/" in str(p) for p in std.items)
    dev = features.find_corpus("spec-bench-dev")
    assert dev.kind == "chat" and len(dev.items) > 10 and all(isinstance(p, str) for p in dev.items)
    jl = tmp_path / "p.jsonl"
    jl.write_text('"one"\n{"prompt": "two"}\n{"turns": ["three", "x"]}\n')
    c = features.find_corpus(str(jl))
    assert c.items == ["one", "two", "three"] and c.kind == "chat"
    d = features.find_corpus(str(_py_corpus(tmp_path / "src")))
    assert d.kind == "code" and len(d.items) == 5
    with pytest.raises(VeridraftError, match="neither stdlib"):
        features.find_corpus(str(tmp_path / "missing"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(VeridraftError, match="line 1"):
        features.find_corpus(str(tmp_path / "bad.jsonl"))


@pytest.fixture(scope="module")
def tiny_model(tiny_smollm2_dir):
    from veridraft.loader import load

    return load(tiny_smollm2_dir("tiny-feat", layers=4), "fp32")


def _run(model, corpus, monkeypatch, home, **kw):
    monkeypatch.setenv("VERIDRAFT_HOME", str(home))
    return features.compute(model, corpus, (0, 1, 2), max_tokens=None, progress=False, **kw)


@pytest.mark.slow
def test_stopped_run_continues_where_it_stopped(tmp_path, monkeypatch, tiny_model):
    corpus = features.find_corpus(str(_py_corpus(tmp_path / "src")))
    monkeypatch.setattr(features, "SHARD_TOKENS", 1)  # a shard per item
    ref_dir, _ = _run(tiny_model, corpus, monkeypatch, tmp_path / "a")
    ref = features.load_samples(ref_dir)
    assert len(features.shards(ref_dir)) == 5

    real, calls = features.target_features, []

    def stop_at_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(features, "target_features", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model, corpus, monkeypatch, tmp_path / "b")
    folder = features.feature_dir(tiny_model, corpus, (0, 1, 2), 192)
    assert [s[1:3] for s in features.shards(folder)] == [(0, 1), (1, 2)]
    calls.clear()
    monkeypatch.setattr(
        features, "target_features", lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    )
    again, _ = _run(tiny_model, corpus, monkeypatch, tmp_path / "b")
    assert len(calls) == 3  # only the items not stored yet
    got = features.load_samples(again)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.aux, b.aux)
        assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.mask, b.mask)
    meta = json.loads((again / "meta.json").read_text())
    assert meta["layers"] == [0, 1, 2] and meta["kind"] == "code"


def test_features_are_the_target_forward(tiny_model):
    ids = tiny_model.tokenizer.encode("def f(x):\n    return x + 1\n" * 20)[:300]
    s = features.target_features(tiny_model.net, ids, (1, 3), [True] * len(ids))
    from veridraft.models.base import Capture

    net = tiny_model.net
    cap = Capture(hidden_layers=(1, 3))
    logits = net(torch.tensor(ids), net.new_cache(len(ids)), capture=cap)
    want = torch.cat([cap.hidden[1], cap.hidden[3]], -1).to(torch.bfloat16)
    torch.testing.assert_close(s.aux.float(), want.float(), atol=2e-2, rtol=1e-2)
    assert s.top_ids[:, 0].tolist() == logits.argmax(-1).tolist()


@pytest.mark.slow
def test_train_head_command_writes_a_head_eagle_drafts_with(
    tmp_path, monkeypatch, tiny_smollm2_dir, capsys
):
    from veridraft.cli import main
    from veridraft.decode import decode
    from veridraft.drafters import make_drafter
    from veridraft.loader import load
    from veridraft.sampling import SamplingParams

    folder = tiny_smollm2_dir("tiny-cmd", layers=4)
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path / "home"))
    src = _py_corpus(tmp_path / "src")
    rc = main(
        [
            "train",
            "head",
            "--model",
            str(folder),
            "--precision",
            "fp32",
            "--corpus",
            str(src),
            "--max-tokens",
            "1500",
            "--epochs",
            "2",
            "--draft-vocab",
            "512",
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "features:" in out and "training:" in out and "held-back acceptance" in out
    head_dir = folder / "heads" / "eagle-src"
    assert (head_dir / "config.json").is_file()
    model = load(folder, "fp32")
    d = make_drafter("eagle:k=3", model)
    prompt = model.tokenizer.encode("def function_1(values, scale=2):\n")
    g = SamplingParams()
    ref, _ = decode(model.net, prompt, max_new_tokens=24, sampling=g, generator=torch.Generator())
    got, st = decode(
        model.net, prompt, max_new_tokens=24, sampling=g, generator=torch.Generator(), drafter=d
    )
    assert got == ref and st.drafted > 0
