"""Dovetail's variant of the head: gated fusion and deeper layers. The draft-time forward
computes the training forward's function, drafts stay lossless, the checkpoint records the
variant, and the vLLM config refuses it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from drafting_helpers import PROMPT, SAMPLING, small_head_config, tiny_llama

from veridraft.decode import decode
from veridraft.drafters import make_drafter
from veridraft.drafters.eagle import (
    VARIANT_ARCH,
    EagleHead,
    HeadConfig,
    HeadRunner,
    check_vllm_loadable,
    default_aux_ids,
    load_head,
    save_head,
)
from veridraft.errors import VeridraftError
from veridraft.sampling import SamplingParams
from veridraft.train.features import target_features
from veridraft.train.head import new_head, target_to_draft, ttt
from veridraft.train.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams()
VARIANTS = [("gated", 1), ("gated", 2), ("fc", 2)]


def _config(fusion: str, layers: int) -> HeadConfig:
    return small_head_config(
        intermediate_size=64, vocab_size=100, draft_vocab_size=50, fusion=fusion, num_layers=layers
    )


def _reference(head: EagleHead, feats, emb, causal):
    """The training forward's pieces (start, layer_qkv, layer_finish), attention written out."""
    c = head.config
    rep = c.num_attention_heads // c.num_key_value_heads
    x, resid = head.start(head.fc(feats), emb)
    for i in range(c.num_layers):
        if i > 0:
            x = head.norm_in(i, resid)
        q, k, v = head.layer_qkv(i, x, torch.arange(feats.shape[0]))
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = torch.einsum("thd,shd->hts", q, k) / c.head_dim**0.5
        a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        resid = head.layer_finish(i, resid, torch.einsum("hts,shd->thd", a, v))
    return resid


@pytest.mark.parametrize("fusion,layers", VARIANTS + [("fc", 1)])
def test_runner_computes_the_training_forward(fusion, layers):
    torch.manual_seed(0)
    head = EagleHead(_config(fusion, layers)).eval()
    feats, emb = torch.randn(6, 96), torch.randn(6, 32)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    run = HeadRunner(head, bf16=False)
    run.reserve(16)
    with torch.no_grad():
        want = _reference(head, feats, emb, causal)
        got = run.layer(run.fc(feats), emb, 0, slice(0, 6), 0, causal)
    assert got.shape == (6, 32)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert run.logits(got).shape == (6, 50)
    # a deeper head keeps a cache per layer, each written
    assert len(run.ks) == layers and all(bool(k[:, :6].abs().sum() > 0) for k in run.ks)


def test_gate_mixes_the_two_branches():
    """Wz = 0 gives z = 1/2 exactly: x = (f W1 + SiLU(RMSNorm(e) W2)) / 2. With Wz pushing z to
    1 where h1 > 0 the embedding branch drops out there, so the gate is not a constant."""
    torch.manual_seed(0)
    head = EagleHead(_config("gated", 1)).eval()
    g = head.gate
    f, e = torch.randn(5, 32), torch.randn(5, 32)
    with torch.no_grad():
        g.wz.weight.zero_()
        h1 = f @ g.w1.weight.T
        h2 = F.silu(g.emb_norm(e) @ g.w2.weight.T)
        assert torch.allclose(g(f, e), (h1 + h2) / 2, atol=1e-6)
        g.wz.weight[torch.arange(32), torch.arange(32)] = 1e4  # z = sigmoid(1e4 * h1)
        x = g(f, e)
        on = h1 > 1e-2
        assert bool(on.any()) and torch.allclose(x[on], h1[on], atol=1e-5)
        assert not torch.allclose(x, (h1 + h2) / 2, atol=1e-3)


def test_the_check_catches_a_gate_fed_the_other_way_round():
    """A control for test_runner_computes_the_training_forward: the same comparison fails when
    the gate reads the feature as the embedding and the embedding as the feature."""
    torch.manual_seed(0)
    head = EagleHead(_config("gated", 1)).eval()
    feats, emb = torch.randn(6, 96), torch.randn(6, 32)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    run = HeadRunner(head, bf16=False)
    run.reserve(16)
    with torch.no_grad():
        want = _reference(head, feats, emb, causal)
        good = run.layer(run.fc(feats), emb, 0, slice(0, 6), 0, causal)
        bad = run.layer(emb, run.fc(feats), 0, slice(0, 6), 0, causal)
    assert torch.allclose(good, want, atol=1e-5)
    assert not torch.allclose(bad, want, atol=1e-3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = tmp_path_factory.mktemp("variant")
        net = tiny_llama(base / "target", seed=0)
        aux = default_aux_ids(net.config.n_layers)
        layers = tuple(i - 1 for i in aux)
        g = torch.Generator().manual_seed(0)
        samples = []
        for _ in range(16):
            prompt = torch.randint(0, 16, (5,), generator=g).tolist()
            new, _ = decode(net, prompt, max_new_tokens=32, sampling=SAMPLING, generator=g)
            ids = prompt + new
            samples.append(target_features(net, ids, layers, [True] * (len(ids) - 1) + [False]))
        for fusion, n in VARIANTS:
            cfg = TrainConfig(
                steps=3, epochs=2, lr=3e-3, batch=4, draft_vocab=16, fusion=fusion, layers=n
            )
            head, _ = train(net, samples, cfg, aux_ids=aux, log=lambda s: None)
            save_head(head, base / f"{fusion}{n}")
            rnd = new_head(net, torch.arange(0, 16, 2), aux_ids=aux, seed=1, fusion=fusion,
                           num_layers=n)  # fmt: skip
            save_head(rnd, base / f"random-{fusion}{n}")
        yield net, base, samples
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("fusion,layers", VARIANTS)
@pytest.mark.parametrize("which", ["", "random-"])
@pytest.mark.parametrize("mode", ["chain,k=4", "tree,k=4,topk=2,nodes=6"])
def test_greedy_equals_plain(tiny, fusion, layers, which, mode):
    net, base, _ = tiny
    ref, _ = decode(net, PROMPT, max_new_tokens=40, sampling=GREEDY, generator=torch.Generator())
    d = make_drafter(f"eagle:head={base}/{which}{fusion}{layers},mode={mode}", net)
    assert d.head.config.fusion == fusion and d.head.config.num_layers == layers
    out, stats = decode(
        net, PROMPT, max_new_tokens=40, sampling=GREEDY, generator=torch.Generator(), drafter=d
    )
    assert out == ref
    assert stats.drafted > 0


@pytest.mark.parametrize("fusion,layers", VARIANTS)
def test_save_load_round_trip_records_the_variant(tmp_path, tiny, fusion, layers):
    _, base, _ = tiny
    head = load_head(base / f"{fusion}{layers}")
    save_head(head, tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["architectures"] == [VARIANT_ARCH]
    assert cfg["num_hidden_layers"] == layers
    var = cfg["veridraft_variant"]
    assert var["fusion"] == fusion and var["num_layers"] == layers
    assert "cannot load" in var["loadable_by"]
    again = load_head(tmp_path / "h")
    assert again.config.fusion == fusion and again.config.num_layers == layers
    sd, sd2 = head.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert any(k.startswith("gate.") for k in sd) == (fusion == "gated")
    assert any(k.startswith("layers.") for k in sd) == (layers > 1)
    if fusion == "gated":  # a plain decoder layer over the gated x (dim, not 2 x dim)
        assert sd["midlayer.self_attn.q_proj.weight"].shape[1] == head.config.hidden_size


def test_vllm_refuses_a_variant_in_one_line(tiny):
    _, base, _ = tiny
    for fusion, layers in VARIANTS:
        with pytest.raises(VeridraftError, match="cannot load") as e:
            check_vllm_loadable(base / f"{fusion}{layers}")
        assert "\n" not in str(e.value)
    check_vllm_loadable(base / "nonexistent")  # the caller reports a missing head


def test_print_vllm_config_refuses_a_variant_head(tiny, tmp_path):
    """`veridraft serve --print-vllm-config` goes through speculative_config: a variant head
    is refused there in one line, an EAGLE-3 head gets its eagle3 config."""
    from veridraft.serve.vllm import speculative_config

    net, base, _ = tiny
    fusion, layers = VARIANTS[0]
    with pytest.raises(VeridraftError, match="cannot load"):
        speculative_config(f"eagle:head={base / f'{fusion}{layers}'}")
    head = new_head(net, torch.arange(8), aux_ids=default_aux_ids(net.config.n_layers))
    save_head(head, tmp_path / "plain")
    cfg, _ = speculative_config(f"eagle:head={tmp_path / 'plain'}")
    assert cfg["method"] == "eagle3" and cfg["model"] == str((tmp_path / "plain").resolve())


def test_eagle3_head_passes_the_vllm_check(tmp_path, tiny):
    net, _, _ = tiny
    head = new_head(net, torch.arange(8), aux_ids=default_aux_ids(net.config.n_layers))
    save_head(head, tmp_path / "h")
    check_vllm_loadable(tmp_path / "h")
    assert json.loads((tmp_path / "h" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLMEagle3"
    ]


@pytest.mark.parametrize("fusion,layers", VARIANTS)
def test_training_forward_predicts_what_the_runner_drafts(tiny, fusion, layers):
    """Step 0 of the training-time test and the drafter's first draft after the real rows are
    the same function: the first step's top-1 per position equals the runner's argmax."""
    net, base, samples = tiny
    head = load_head(base / f"{fusion}{layers}")
    s = samples[0]
    n = int(s.ids.numel())
    emb = net.embed(s.ids.long()).float()
    t2d = target_to_draft(head)
    with torch.no_grad():
        _, correct, valid = ttt(
            head,
            s.aux.float()[None],
            emb[None],
            s.top_ids.long()[None],
            s.top_p.float()[None],
            s.mask[None],
            1,
            t2d,
        )
        run = HeadRunner(head, bf16=False)
        run.reserve(n + 1)
        e = torch.zeros_like(emb)
        e[:-1] = emb[1:]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        out = run.layer(run.fc(s.aux.float()), e, 0, slice(0, n), 0, causal)
        pred = run.logits(out).argmax(-1)
    top = torch.zeros(n, dtype=torch.long)
    top[:-1] = t2d[s.top_ids[1:, 0].long()]
    v = valid[0, 0]
    assert bool(v.any())
    assert torch.equal(correct[0, 0][v], (pred == top)[v])
