"""LongSpec's constant-size draft as an option of the EAGLE-3 head: a sliding window plus an
attention sink over the head's own cache (drafting), a banded mask and anchor-offset positions
(training). Lossless with a window, the window's attention against a plain reference, chunked
catch-up, the config key, the errors."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch
from drafting_helpers import PROMPT, SAMPLING, Shadow, small_head_config, tiny_llama

from veridraft.bench.eagle_head import FakeTarget, attend
from veridraft.decode import decode
from veridraft.draft import DecodeContext
from veridraft.drafters import eagle, make_drafter
from veridraft.drafters.eagle import (
    LONG_KEY,
    EagleDrafter,
    EagleHead,
    HeadConfig,
    default_aux_ids,
    load_head,
    save_head,
)
from veridraft.errors import VeridraftError
from veridraft.models.base import Capture
from veridraft.sampling import SamplingParams
from veridraft.train.features import target_features
from veridraft.train.head import new_head, target_to_draft, ttt
from veridraft.train.trainer import TrainConfig, evaluate, train

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams()
LONG = PROMPT * 2  # 38 tokens: longer than sink + 2 x window below, so the cache compacts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = tmp_path_factory.mktemp("window")
        net = tiny_llama(base / "target", seed=0)
        aux = default_aux_ids(net.config.n_layers)
        save_head(new_head(net, torch.arange(16), aux_ids=aux, seed=1), base / "random")
        windowed = new_head(net, torch.arange(16), aux_ids=aux, seed=1, window=4, sink=2)
        save_head(windowed, base / "w4")
        yield net, base
    finally:
        torch.set_num_threads(threads)


def small_head(**kw) -> EagleHead:
    c = small_head_config(**kw)
    torch.manual_seed(0)
    head = EagleHead(c)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("proj.weight"):
                p.mul_(4.0)  # sharper attention: a wrong row set shows in the output
    return head.eval()


def fed(drafter: EagleDrafter, n: int, seed: int = 0):
    """The drafter after its prompt of n + 1 ids (n feature rows) ran through the head."""
    c = drafter.head.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, c.vocab_size, (n + 1,), generator=g).tolist()
    layers = c.capture_layers
    cap = Capture(
        hidden_layers=layers,
        hidden={i: torch.randn(n, c.target_hidden_size, generator=g) for i in layers},
    )
    ctx = DecodeContext(
        ids=ids,
        prompt_len=n + 1,
        target=FakeTarget(c.hidden_size, seed),
        cache=SimpleNamespace(max_len=n + 64),
        sampling=GREEDY,
        generator=torch.Generator(),
        prompt_capture=cap,
    )
    drafter.prefill(ctx)
    feats = torch.cat([cap.hidden[i] for i in layers], -1)
    with torch.inference_mode():
        drafter._catch_up(ids)
    return ctx, feats


def band(n: int, window: int | None, sink: int) -> torch.Tensor:
    r = torch.arange(n)
    m = r[None] <= r[:, None]
    if window is not None:
        m &= (r[None] > r[:, None] - window) | (r[None] < sink)
    return m


@pytest.mark.parametrize("w, s", [(6, 3), (5, 0)])
def test_window_attends_to_exactly_the_sink_and_the_last_rows(monkeypatch, w, s):
    """The control: after chunked catch-up and compactions, the last real row's output (and a
    drafted row's) equals the head run plainly over all rows at their target positions with
    a mask that keeps the sink and the last `window` rows, and differs from full attention."""
    monkeypatch.setattr(eagle, "CATCH_UP_ROWS", 5)
    head = small_head()
    n = 37
    d = EagleDrafter(head, mode="chain", k=3, window=w, sink=s)
    ctx, feats = fed(d, n)
    assert d._dropped > 0 and d._len <= s + 2 * w
    assert d.runner.rows < n and d.runner.cos.shape[0] > n  # few rows, every position
    with torch.no_grad():
        hidden = head.fc(feats)
        emb = ctx.target.embed(torch.tensor(ctx.ids[1 : n + 1]))
        q, k, v = head.qkv(hidden, emb, torch.arange(n))
        want = head.finish(hidden, attend(q, k, v, band(n, w, s)))[-1:]
        full = head.finish(hidden, attend(q, k, v, band(n, None, s)))[-1:]
        torch.testing.assert_close(d._h, want)
        assert (d._h - full).abs().max() > 1e-2
        # a drafted row at position n: the last real row's rows, and itself
        h2, e2 = want, ctx.target.embed(torch.tensor([5]))
        q2, k2, v2 = head.qkv(h2, e2, torch.tensor([n]))
        mask = torch.cat((band(n, w, s)[-1:], torch.ones(1, 1, dtype=torch.bool)), 1)
        want2 = head.finish(h2, attend(q2, torch.cat((k, k2)), torch.cat((v, v2)), mask))
        got2 = d.runner.layer(d._h, e2, d._len, slice(n, n + 1), d._len, None, d._hide())
        torch.testing.assert_close(got2, want2)
        # control of the control: the same row at the position of its cache row differs
        q3, k3, v3 = head.qkv(h2, e2, torch.tensor([d._len]))
        wrong = head.finish(h2, attend(q3, torch.cat((k, k3)), torch.cat((v, v3)), mask))
        assert (wrong - want2).abs().max() > 1e-3


@pytest.mark.parametrize("window", [None, 4])
def test_chunked_catch_up_equals_one_call(monkeypatch, window):
    head = small_head()
    outs = []
    for rows in (4096, 7):
        monkeypatch.setattr(eagle, "CATCH_UP_ROWS", rows)
        d = EagleDrafter(head, mode="chain", k=3, window=window, sink=2)
        fed(d, 40)
        outs.append((d._h, d._logits))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_default_window_is_full_attention_draft_for_draft(tiny, monkeypatch, mode):
    """A head trained without a window drafts as before: every round's draft equals the
    full-attention drafter's with one-call catch-up, also with chunked catch-up (a prompt of
    38 rows in chunks of 8); a window on the same head drafts differently (the control)."""
    net, base = tiny
    head = load_head(base / "random")
    assert head.config.window is None
    params = {"mode": mode, "k": 4, "topk": 3, "nodes": 10}
    plain = EagleDrafter(head, **params)
    monkeypatch.setattr(eagle, "CATCH_UP_ROWS", 8)
    others = (EagleDrafter(head, **params), EagleDrafter(head, window=4, sink=2, **params))
    for other, same in zip(others, (True, False)):
        pair = Shadow(other, plain)
        gen = torch.Generator()
        decode(net, LONG, max_new_tokens=40, sampling=GREEDY, generator=gen, drafter=pair)
        assert pair.rounds >= 10
        assert (pair.differ == 0) == same, (pair.rounds, pair.differ)
    assert plain.window is None and plain._dropped == 0


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_windowed_greedy_output_equals_plain_decoding(tiny, mode):
    net, base = tiny
    ref, _ = decode(net, LONG, max_new_tokens=48, sampling=GREEDY, generator=torch.Generator())
    spec = f"eagle:head={base / 'w4'},mode={mode},k=4,topk=2,nodes=6"
    d = make_drafter(spec, net)
    assert d.window == 4 and d.sink == 2  # the head's own
    out, stats = decode(
        net, LONG, max_new_tokens=48, sampling=GREEDY, generator=torch.Generator(), drafter=d
    )
    assert out == ref
    assert stats.drafted > 0 and d._dropped > 0  # compacted while decoding
    assert d.runner.rows <= 2 + 2 * 4 + eagle.CATCH_UP_ROWS + 4 * 2


def test_windowed_sampling_runs(tiny):
    net, base = tiny
    d = make_drafter(f"eagle:head={base / 'w4'},mode=chain,k=3", net)
    out, stats = decode(
        net,
        LONG,
        max_new_tokens=30,
        sampling=SAMPLING,
        generator=torch.Generator().manual_seed(0),
        drafter=d,
    )
    assert len(out) == 30 and stats.drafted > 0


def test_config_round_trip_with_and_without_the_window(tmp_path, tiny):
    _, base = tiny
    plain = json.loads((base / "random" / "config.json").read_text())
    assert LONG_KEY not in plain
    assert load_head(base / "random").config.window is None
    cfg = json.loads((base / "w4" / "config.json").read_text())
    assert cfg[LONG_KEY] == {"window": 4, "sink": 2, "anchor_offset": 0}
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]  # EAGLE-3's tensors, loadable
    c = load_head(base / "w4").config
    assert (c.window, c.sink, c.anchor_offset) == (4, 2, 0)
    again = HeadConfig.from_hf(HeadConfig(**{**vars(c), "anchor_offset": 64}).to_hf(), "x")
    assert (again.window, again.sink, again.anchor_offset) == (4, 2, 64)
    # an offset alone (full attention) is recorded too
    only = HeadConfig(**{**vars(c), "window": None, "anchor_offset": 9})
    off = HeadConfig.from_hf(only.to_hf(), "x")
    assert (off.window, off.anchor_offset) == (None, 9)
    bad = {**cfg, LONG_KEY: {"window": 0, "sink": 2}}
    with pytest.raises(VeridraftError, match="window must be >= 1") as e:
        HeadConfig.from_hf(bad, "h")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "params, match",
    [("window=0", "window"), ("window=-3", "window"), ("sink=-1", "sink"), ("window=x", "window")],
)
def test_bad_window_values_are_one_line_errors(tiny, params, match):
    net, base = tiny
    with pytest.raises(VeridraftError, match=match) as e:
        make_drafter(f"eagle:head={base / 'random'},{params}", net)
    assert "\n" not in str(e.value)


def test_another_window_than_trained_is_allowed_and_said(tiny):
    net, base = tiny
    ref, _ = decode(net, LONG, max_new_tokens=24, sampling=GREEDY, generator=torch.Generator())
    for value, used in (("8", 8), ("full", None)):
        with pytest.warns(UserWarning, match="trained for window=4, drafting with window="):
            d = make_drafter(f"eagle:head={base / 'w4'},mode=chain,window={value}", net)
        assert d.window == used
        out, _ = decode(
            net, LONG, max_new_tokens=24, sampling=GREEDY, generator=torch.Generator(), drafter=d
        )
        assert out == ref


def test_train_cli_rejects_bad_window_values():
    from veridraft.train.cli import add_train_parser

    ap = argparse.ArgumentParser()
    add_train_parser(ap.add_subparsers())
    for argv, match in (
        (["--window", "0"], "--window 0: give a window >= 1"),
        (["--sink", "-1"], "--sink and --anchor-offset must be >= 0"),
        (["--window", "8", "--anchor-offset", "-2"], "--sink and --anchor-offset"),
    ):
        args = ap.parse_args(["train", "head", *argv])
        with pytest.raises(VeridraftError, match=match):
            args.func(args)


# -- training --


def own_text(net, n: int, length: int, seed: int = 0):
    layers = tuple(i - 1 for i in default_aux_ids(net.config.n_layers))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(0, 16, (5,), generator=g).tolist()
        new, _ = decode(net, prompt, max_new_tokens=length, sampling=SAMPLING, generator=g)
        ids = prompt + new
        out.append(target_features(net, ids, layers, [True] * (len(ids) - 1) + [False]))
    return out


def test_ttt_band_and_offsets_change_the_loss(tiny):
    """The banded mask and the anchor offsets reach the loss: zero offsets are no offsets
    (bitwise), a window shorter than the samples and a nonzero offset both change it."""
    from veridraft.train.trainer import _batch

    net, _ = tiny
    samples = own_text(net, 3, 30)
    aux = default_aux_ids(net.config.n_layers)
    batch = _batch(net, samples)

    def loss(offsets=None, **kw):
        head = new_head(net, torch.arange(16), aux_ids=aux, seed=2, **kw)
        with torch.no_grad():
            return ttt(head, *batch, 3, target_to_draft(head), offsets)[0]

    base = loss()
    assert torch.equal(loss(torch.zeros(3, dtype=torch.long)), base)
    assert not torch.allclose(loss(window=4, sink=2), base)
    assert torch.equal(loss(window=64, sink=2), base)  # a window longer than every sample
    assert not torch.allclose(loss(torch.tensor([0, 50, 900])), base)


def test_training_with_a_window_and_anchor_offset_lowers_the_loss(tiny, tmp_path):
    net, _ = tiny
    samples = own_text(net, 30, 40, seed=1)
    aux = default_aux_ids(net.config.n_layers)
    cfg = TrainConfig(
        steps=3, epochs=6, lr=3e-3, batch=4, draft_vocab=16, window=8, sink=2, anchor_offset=200
    )
    head, rep = train(net, samples, cfg, aux_ids=aux, log=lambda s: None)
    assert rep.losses[-1] < rep.losses[0] - 0.1, rep.losses
    c = head.config
    assert (c.window, c.sink, c.anchor_offset) == (8, 2, 200)
    untrained = new_head(net, head.draft_ids, aux_ids=aux, window=8, sink=2)
    assert rep.held[-1][0] < evaluate(untrained, net, samples[-3:], 3, 4)[0]
    save_head(head, tmp_path / "h")
    d = make_drafter(f"eagle:head={tmp_path / 'h'},mode=chain,k=3", net)
    assert d.window == 8
    ref, _ = decode(net, LONG, max_new_tokens=30, sampling=GREEDY, generator=torch.Generator())
    out, _ = decode(
        net, LONG, max_new_tokens=30, sampling=GREEDY, generator=torch.Generator(), drafter=d
    )
    assert out == ref


def test_windowed_gated_two_layer_head_stays_exact(tiny, tmp_path):
    """Every layer of a deeper head sees the same rows; output stays plain decoding's."""
    net, _ = tiny
    aux = default_aux_ids(net.config.n_layers)
    head = new_head(
        net, torch.arange(16), aux_ids=aux, seed=3, fusion="gated", num_layers=2, window=3, sink=1
    )
    save_head(head, tmp_path / "g")
    ref, _ = decode(net, LONG, max_new_tokens=32, sampling=GREEDY, generator=torch.Generator())
    for mode in ("chain", "tree"):
        d = make_drafter(f"eagle:head={tmp_path / 'g'},mode={mode},k=3,topk=2,nodes=5", net)
        out, stats = decode(
            net, LONG, max_new_tokens=32, sampling=GREEDY, generator=torch.Generator(), drafter=d
        )
        assert out == ref and stats.drafted > 0 and d._dropped > 0, mode


@pytest.mark.parametrize("window", [4, None])
def test_training_sees_the_rows_drafting_sees(tiny, monkeypatch, window):
    """Step 0 of the training-time test (banded mask) computes, at every position, what the
    drafter computes for its last real row after catch-up, compactions and chunks included."""
    from veridraft.train.trainer import _batch

    net, _ = tiny
    monkeypatch.setattr(eagle, "CATCH_UP_ROWS", 6)
    sample = own_text(net, 1, 40, seed=5)[0]
    aux = default_aux_ids(net.config.n_layers)
    head = new_head(net, torch.arange(16), aux_ids=aux, seed=4, window=window, sink=2)
    seen: list[torch.Tensor] = []
    real_logits = head.logits
    monkeypatch.setattr(head, "logits", lambda h: seen.append(h) or real_logits(h))
    with torch.no_grad():
        ttt(head, *_batch(net, [sample]), 1, target_to_draft(head))
    step0 = seen[0]  # the rows whose next token counts: positions 0 .. T - 2
    ids = sample.ids.tolist()
    for n in (9, 23, len(ids) - 2):
        d = EagleDrafter(head, mode="chain", k=2)
        ctx = DecodeContext(
            ids=ids[: n + 1],
            prompt_len=n + 1,
            target=net,
            cache=SimpleNamespace(max_len=len(ids) + 8),
            sampling=GREEDY,
            generator=torch.Generator(),
        )
        d.prefill(ctx)
        d._start, d._pending = 0, [sample.aux[:n].float()]
        with torch.inference_mode():
            d._catch_up(ctx.ids)
        torch.testing.assert_close(d._h[0], step0[n - 1], atol=1e-4, rtol=1e-4)
    assert (window is not None) == (d._dropped > 0)


def test_print_vllm_config_says_vllm_runs_a_windowed_head_with_full_attention(tiny):
    from veridraft.serve.vllm import speculative_config

    _, base = tiny
    cfg, notes = speculative_config(f"eagle:head={base / 'w4'}:mode=chain")
    assert cfg["method"] == "eagle3"  # EAGLE-3's tensors: vLLM loads it
    assert any("window of 4" in n and "full attention" in n for n in notes)
    _, notes = speculative_config(f"eagle:head={base / 'random'}:mode=chain,window=16")
    assert any("window of 16" in n for n in notes)
    _, notes = speculative_config(f"eagle:head={base / 'random'}:mode=chain")
    assert not any("window" in n for n in notes)
    _, notes = speculative_config(f"eagle:head={base / 'w4'}:mode=chain,window=full")
    assert not any("window" in n for n in notes)
