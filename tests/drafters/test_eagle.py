"""The EAGLE-3 head drafter: lossless (greedy bitwise, sampling in distribution), features from
the verification forwards, clear errors for a missing or mismatched head, the checkpoint format.
"""

from __future__ import annotations

import json

import pytest
import torch
from drafting_helpers import (
    ACCEPT_P,
    PROMPT,
    REJECT_P,
    SAMPLING,
    Shadow,
    chi2_pvalue,
    count_trees,
    exact_joint,
    sample_first,
    small_head_config,
    tiny_llama,
)
from safetensors.torch import load_file

from veridraft.bench import eagle_head
from veridraft.bench.eagle_head import PlainDrafter, attend
from veridraft.decode import decode
from veridraft.draft import Draft, DraftEnv
from veridraft.drafters import make_drafter
from veridraft.drafters.eagle import (
    EagleDrafter,
    EagleHead,
    HeadRunner,
    default_aux_ids,
    load_head,
    save_head,
)
from veridraft.errors import VeridraftError
from veridraft.models.base import Capture
from veridraft.sampling import SamplingParams
from veridraft.train.features import target_features
from veridraft.train.head import new_head
from veridraft.train.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams()
N_TOKENS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The lossless tests' tiny target (vocab 16), its exact joint of 3 tokens, and two heads
    saved as EAGLE-3 folders: random, and trained briefly on the target's own text."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before `one_thread`; tiny ops, no pool
    try:
        yield _build(tmp_path_factory.mktemp("eagle"))
    finally:
        torch.set_num_threads(threads)


def _build(base):
    net = tiny_llama(base / "target", seed=0)
    joint = exact_joint(net, PROMPT, N_TOKENS, SAMPLING)
    aux = default_aux_ids(net.config.n_layers)
    random_head = new_head(net, torch.arange(0, 16, 2), aux_ids=aux, seed=1)  # half the ids
    save_head(random_head, base / "random")
    layers = tuple(i - 1 for i in aux)
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(24):
        prompt = torch.randint(0, 16, (5,), generator=g).tolist()
        new, _ = decode(net, prompt, max_new_tokens=40, sampling=SAMPLING, generator=g)
        ids = prompt + new
        samples.append(target_features(net, ids, layers, [True] * (len(ids) - 1) + [False]))
    cfg = TrainConfig(steps=3, epochs=4, lr=3e-3, batch=4, draft_vocab=16)
    trained, _ = train(net, samples, cfg, aux_ids=aux, log=lambda s: None)
    save_head(trained, base / "trained")
    return net, joint, base


SPECS = {
    "random-chain": "eagle:head={base}/random,mode=chain,k=4",
    "random-tree": "eagle:head={base}/random,mode=tree,k=4,topk=3,nodes=8",
    "trained-chain": "eagle:head={base}/trained,mode=chain,k=4",
    "trained-tree": "eagle:head={base}/trained,mode=tree,k=4,topk=2,nodes=6",
    "bf16-chain": "eagle:head={base}/trained,mode=chain,k=4,weights=bf16",
    "bf16-tree": "eagle:head={base}/trained,mode=tree,k=4,topk=2,nodes=6,weights=bf16",
}


def test_greedy_equals_plain(tiny):
    net, _, base = tiny
    ref, _ = decode(net, PROMPT, max_new_tokens=40, sampling=GREEDY, generator=torch.Generator())
    for which in SPECS:
        d = make_drafter(SPECS[which].format(base=base), net)
        trees = count_trees(d)
        out, stats = decode(
            net, PROMPT, max_new_tokens=40, sampling=GREEDY, generator=torch.Generator(), drafter=d
        )
        assert out == ref, which
        assert 0 < stats.accepted < stats.drafted, which
        assert (trees["trees"] > 0) == which.endswith("tree"), which


def test_prefilled_prompt_without_features_stays_exact(tiny):
    """A prompt prefilled before the drafter was known has no captured features: the head
    starts at the first verified position and the output is still plain decoding's."""
    from veridraft.decode import prefill

    net, _, base = tiny
    ref, _ = decode(net, PROMPT, max_new_tokens=30, sampling=GREEDY, generator=torch.Generator())
    pre = prefill(net, PROMPT, len(PROMPT) + 30 + 17)
    d = make_drafter(SPECS["trained-tree"].format(base=base), net)
    out, stats = decode(
        net,
        PROMPT,
        max_new_tokens=30,
        sampling=GREEDY,
        generator=torch.Generator(),
        drafter=d,
        prefilled=pre,
    )
    assert out == ref and stats.drafted > 0


@pytest.mark.slow
@pytest.mark.parametrize("which", list(SPECS))
def test_sampling_distribution_matches_exact(tiny, which):
    net, joint, base = tiny
    d = make_drafter(SPECS[which].format(base=base), net)
    counts = sample_first(net, PROMPT, d, 2000, N_TOKENS, SAMPLING, seed=1)
    assert chi2_pvalue(counts, joint) > ACCEPT_P


def test_runner_computes_the_heads_layer():
    """HeadRunner (stacked weights, in-place head-major cache, grouped attention without
    repeated KV, RoPE tables) is EagleHead's layer: the prompt's rows causally, then a tree
    level whose rows each see the real rows, their drafted ancestors and themselves."""
    c = small_head_config()
    torch.manual_seed(0)
    head = EagleHead(c)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    run = HeadRunner(head, bf16=False)
    run.reserve(16)
    feats, emb = torch.randn(6, 96), torch.randn(6, 32)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    with torch.no_grad():
        hidden = head.fc(feats)
        q, k, v = head.qkv(hidden, emb, torch.arange(6))
        want = head.finish(hidden, attend(q, k, v, causal))
        got = run.layer(run.fc(feats), emb, 0, slice(0, 6), 0, causal)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(run.logits(got), head.logits(want))
        # three drafted rows at one position past the real ones; the third is the first's child
        h2, e2 = torch.randn(3, 32), torch.randn(3, 32)
        tree = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
        q2, k2, v2 = head.qkv(h2, e2, torch.full((3,), 6))
        mask = torch.cat((torch.ones(3, 6, dtype=torch.bool), tree), 1)
        want2 = head.finish(h2, attend(q2, torch.cat((k, k2)), torch.cat((v, v2)), mask))
        got2 = run.layer(h2, e2, 6, slice(6, 7), 6, tree)
        torch.testing.assert_close(got2, want2)


def test_bf16_runner_rounds_only(tiny):
    """bfloat16 weights change the head's numbers by rounding, not its predictions."""
    _, _, base = tiny
    head = load_head(base / "trained")
    f32, b16 = HeadRunner(head, bf16=False), HeadRunner(head, bf16=True)
    torch.manual_seed(1)
    feats = torch.randn(5, 3 * head.config.target_hidden_size)
    emb = torch.randn(5, head.config.hidden_size)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    outs = []
    with torch.no_grad():
        for run in (f32, b16):
            run.reserve(8)
            outs.append(run.logits(run.layer(run.fc(feats), emb, 0, slice(0, 5), 0, causal)))
    torch.testing.assert_close(outs[1], outs[0], atol=0.1, rtol=0.05)
    assert not torch.equal(outs[1], outs[0])


SHADOWED = {
    "chain": {"mode": "chain", "k": 4},
    "tree": {"mode": "tree", "k": 4, "topk": 3, "nodes": 10},
}


def _shadow(net, head, params) -> Shadow:
    sh = Shadow(EagleDrafter(head, **params), PlainDrafter(head, **params))
    for start in (0, 4, 8):  # three prompts: rounds at many cache lengths
        prompt = PROMPT[start:] + PROMPT[:start]
        decode(
            net, prompt, max_new_tokens=40, sampling=GREEDY, generator=torch.Generator(), drafter=sh
        )
    return sh


@pytest.mark.parametrize("which", ["random", "trained"])
@pytest.mark.parametrize("mode", list(SHADOWED))
def test_runner_drafts_what_the_plain_head_drafts(tiny, which, mode):
    """The drafter's forward (HeadRunner) proposes, round after round, exactly the tokens and
    tree the head run plainly proposes (PlainDrafter: EagleHead's pieces, repeated KV, a
    concatenated cache, the previous implementation)."""
    net, _, base = tiny
    sh = _shadow(net, load_head(base / which), SHADOWED[mode])
    assert sh.rounds >= 30 and sh.differ == 0, (sh.rounds, sh.differ)
    assert (sh.branched > sh.rounds // 2) == (mode == "tree"), sh.branched


def _ungrouped(q, k, v, mask):
    """Grouped attention with the groups dealt round-robin (`repeat`, not
    `repeat_interleave`): query head h reads KV head h % kv_heads."""
    rep = q.shape[1] // k.shape[1]
    return attend(q, k.repeat(1, rep, 1), v.repeat(1, rep, 1), mask)


@pytest.mark.parametrize("mode", list(SHADOWED))
def test_shadow_catches_a_wrong_grouping(tiny, monkeypatch, mode):
    """The control: a reference that pairs query heads with the wrong KV heads (in the random
    head, the only change) drafts differently, and the comparison above sees it."""
    net, _, base = tiny
    head = load_head(base / "random")
    assert head.config.num_attention_heads > head.config.num_key_value_heads > 1
    monkeypatch.setattr(eagle_head, "attend", _ungrouped)
    sh = _shadow(net, head, SHADOWED[mode])
    assert sh.rounds >= 30 and sh.differ > 0, (sh.rounds, sh.differ)


class _Lying:
    """The trained chain drafter, reporting a sharpened q (q^4, renormalised) for the tokens it
    sampled from its head's q: the control the statistic above must reject."""

    name = "eagle-lying"

    def __init__(self, inner: EagleDrafter) -> None:
        self.inner = inner
        self.verify_capture = inner.verify_capture
        self.prompt_capture = inner.prompt_capture

    def prefill(self, ctx) -> None:
        self.inner.prefill(ctx)

    def propose(self, ctx, max_tokens: int) -> Draft:
        d = self.inner.propose(ctx, max_tokens)
        q = None if d.q is None else d.q**4 / (d.q**4).sum(-1, keepdim=True)
        return Draft(tokens=d.tokens, q=q, parents=d.parents)

    def update(self, rnd) -> None:
        self.inner.update(rnd)


@pytest.mark.slow
def test_lying_q_is_caught(tiny):
    net, joint, base = tiny
    d = _Lying(make_drafter(SPECS["trained-chain"].format(base=base), net))
    counts = sample_first(net, PROMPT, d, 2000, N_TOKENS, SAMPLING, seed=1)
    assert chi2_pvalue(counts, joint) < REJECT_P


class _Recording(EagleDrafter):
    """Keeps every feature row the loop handed over (the prompt's, then each round's)."""

    def prefill(self, ctx) -> None:
        self.rows = []
        super().prefill(ctx)
        self.rows.extend(self._pending)

    def update(self, rnd) -> None:
        super().update(rnd)
        self.rows.append(self._pending[-1])


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_captured_features_equal_a_separate_forward(tiny, mode):
    """The rows the drafter keeps (prompt capture + the accepted path of every verification,
    chain or tree) are the target's hidden states of the committed ids, as one separate forward
    over them computes."""
    net, _, base = tiny
    d = _Recording(load_head(base / "trained"), mode=mode, k=4, topk=2, nodes=6)
    trees = count_trees(d)
    new, _ = decode(
        net, PROMPT, max_new_tokens=30, sampling=GREEDY, generator=torch.Generator(), drafter=d
    )
    ids = PROMPT + new
    got = torch.cat(d.rows)
    layers = d.head.config.capture_layers
    cap = Capture(hidden_layers=layers)
    net(torch.tensor(ids[:-1]), net.new_cache(len(ids)), capture=cap)
    want = torch.cat([cap.hidden[i] for i in layers], -1)
    assert (trees["trees"] > 0) == (mode == "tree")
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_missing_head_names_the_train_command(tmp_path, tiny):
    net, _, _ = tiny
    with pytest.raises(VeridraftError, match=r"veridraft train head --model") as e:
        make_drafter(f"eagle:head={tmp_path / 'nothing'}", net)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field", ["hidden", "vocab"])
def test_mismatched_head_names_the_train_command(tmp_path, tiny, field):
    net, _, base = tiny
    other = tiny_llama(
        tmp_path / "other",
        vocab=32 if field == "vocab" else 16,
        layers=4,
    )
    if field == "hidden":
        import transformers

        cfg = transformers.LlamaConfig(
            vocab_size=16,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "wide")
        from veridraft.models import from_folder

        other = from_folder(tmp_path / "wide")
    with pytest.raises(VeridraftError, match=r"does not fit .*veridraft train head --model") as e:
        make_drafter(f"eagle:head={base / 'trained'}", other)
    assert ("hidden size" in str(e.value)) == (field == "hidden")
    assert ("vocabulary" in str(e.value)) == (field == "vocab")
    assert "\n" not in str(e.value)


def test_default_head_is_found_next_to_the_model(tmp_path, tiny):
    net, _, base = tiny

    class Loaded:  # what the loader hands drafters: name, folder, network
        name = "tiny"
        path = tmp_path
        config = net.config

    Loaded.net = net
    with pytest.raises(VeridraftError, match="veridraft train head --model tiny"):
        make_drafter("eagle", Loaded(), env=DraftEnv())
    save_head(load_head(base / "trained"), tmp_path / "heads" / "eagle-own")
    d = make_drafter("eagle:k=3,mode=chain", Loaded(), env=DraftEnv())
    assert d.k == 3 and d.head.config.draft_vocab_size == 16


def test_save_load_round_trip_in_eagle3_format(tmp_path, tiny):
    net, _, base = tiny
    head = load_head(base / "random")
    save_head(head, tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == 8 and cfg["vocab_size"] == 16
    assert cfg["hidden_size"] == net.config.dim
    ids = cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    assert ids == list(default_aux_ids(net.config.n_layers))
    sd = load_file(str(tmp_path / "h" / "model.safetensors"))
    for name in (
        "fc.weight",
        "midlayer.input_layernorm.weight",
        "midlayer.hidden_norm.weight",
        "midlayer.self_attn.q_proj.weight",
        "midlayer.self_attn.k_proj.weight",
        "midlayer.self_attn.v_proj.weight",
        "midlayer.self_attn.o_proj.weight",
        "midlayer.post_attention_layernorm.weight",
        "midlayer.mlp.gate_proj.weight",
        "midlayer.mlp.up_proj.weight",
        "midlayer.mlp.down_proj.weight",
        "norm.weight",
        "lm_head.weight",
        "d2t",
        "t2d",
    ):
        assert name in sd, name
    assert sd["fc.weight"].shape == (net.config.dim, 3 * net.config.dim)
    assert sd["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * net.config.dim
    assert sd["d2t"].dtype == torch.int64 and sd["t2d"].dtype == torch.bool
    # target id = draft id + d2t[draft id]; t2d marks the same ids
    used = torch.arange(8) + sd["d2t"]
    assert used.tolist() == list(range(0, 16, 2))
    assert sd["t2d"].nonzero().flatten().tolist() == used.tolist()
    again = load_head(tmp_path / "h")
    for k, v in head.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_vllm_config_points_at_the_head_folder(tmp_path, tiny):
    from veridraft.serve.vllm import speculative_config

    _, _, base = tiny
    cfg, _ = speculative_config(f"eagle:head={base / 'trained'}:k=4,mode=chain")
    assert cfg == {
        "method": "eagle3",
        "model": str((base / "trained").resolve()),
        "num_speculative_tokens": 4,
    }
    with pytest.raises(VeridraftError, match="veridraft train head --model"):
        speculative_config("eagle", model=str(tmp_path))
