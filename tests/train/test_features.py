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


def test_chat_corpora_leave_out_every_question_the_benchmark_measures_on():
    """`veridraft bench --limit N` (N <= HELD_OUT_LIMIT) measures on questions no chat corpus
    trains on; the corpora still use the rest of the dev file."""
    from veridraft.bench.questions import load_questions, select

    qs = load_questions(features.spec_bench_dev_path())
    assert features.HELD_OUT_LIMIT >= 8  # the documented promise
    measured = set()
    for n in range(1, features.HELD_OUT_LIMIT + 1):
        measured |= {q.turns[0] for q in select(qs, limit=n)}
    dev = features.find_corpus("spec-bench-dev")
    mix = features.find_corpus("chat-mix")
    for c in (dev, mix):
        assert not measured & set(c.items), c.name
    assert len(dev.items) + len(measured) == len(qs)  # everything else is used
    assert set(dev.items) <= set(mix.items)
    held = {str(r["turns"][0]) for r, h in features.dev_questions() if h}
    assert held == measured


def test_spread_is_the_benchmarks():
    from veridraft.bench.questions import spread

    for items in (1, 5, 40, 80):
        for n in range(1, 12):
            assert features._spread(items, n) == spread(items, n)


def test_novel_prompts_are_passages_behind_an_instruction():
    novels = features.find_corpus("novels")
    assert novels.kind == "chat" and len(novels.items) > 200
    assert all(p.split("\n\n", 1)[0] in features.NOVEL_TASKS for p in novels.items)
    assert len({p.split("\n\n", 1)[0] for p in novels.items}) == len(features.NOVEL_TASKS)
    mix = features.find_corpus("chat-mix")
    assert set(novels.items) <= set(mix.items)
    # interleaved: a --max-tokens cut keeps both kinds
    first = mix.items[:10]
    assert any(p in novels.items for p in first) and any(p not in novels.items for p in first)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_answers_generated_together_are_the_answers_alone(tiny_smollm2_dir, precision):
    from veridraft.loader import load

    model = load(tiny_smollm2_dir(f"tiny-chat-{precision}", layers=2), precision)
    prompts = ["Tell me about the sea.", "Continue: It was a dark night", "Why?", "Summarise x"]
    alone = [features._chat_ids(model, p, 24) for p in prompts]
    together = features.chat_answers(model, prompts, 24)
    assert together == alone
    assert all(len(ids) > n for ids, n in together)  # each has an answer


def test_chat_features_in_groups_equal_one_at_a_time(tmp_path, monkeypatch, tiny_smollm2_dir):
    from veridraft.loader import load

    model = load(tiny_smollm2_dir("tiny-chat-groups", layers=4), "fp32")
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps(f"Question number {i}?") for i in range(5)) + "\n")
    corpus = features.find_corpus(str(jl))
    a, _ = _run(model, corpus, monkeypatch, tmp_path / "a", answer_tokens=12, gen_batch=1)
    b, _ = _run(model, corpus, monkeypatch, tmp_path / "b", answer_tokens=12, gen_batch=3)
    sa, sb = features.load_samples(a), features.load_samples(b)
    assert len(sa) == len(sb) == 5
    for x, y in zip(sa, sb):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.mask, y.mask)
        assert torch.equal(x.aux, y.aux)
