"""Native models vs transformers on tiny random checkpoints of every supported architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from veridraft.errors import VeridraftError
from veridraft.models import Capture, ModelConfig, Skip, from_folder

VOCAB = 96
PROMPT, DECODE = 20, 32  # 52 positions: well past the sliding windows below
WINDOW = 6
ATOL = 1e-4

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.15,  # logits of order 1, so 1e-4 is a real bound
)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
    "llama3-rope": lambda: transformers.LlamaConfig(
        **COMMON,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=WINDOW),
    "qwen2": lambda: transformers.Qwen2Config(
        **COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2
    ),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=24),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **COMMON,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 1
        + ["sliding_attention"],
        final_logit_softcapping=5.0,
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, native model, folder) for one architecture."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIGS[request.param]()).float().eval()
    with torch.no_grad():  # norm weights start at 0 / 1; perturb them so they are exercised
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    hf.generation_config.eos_token_id = None
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, from_folder(folder), folder


def ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens[None]).logits[0].float()


def test_prompt_and_cached_decode_match(pair):
    hf, model, _ = pair
    seq = ids(PROMPT + DECODE)
    ref = hf_logits(hf, seq)
    cache = model.new_cache(64)
    got = [model(seq[:PROMPT], cache)]
    for i in range(PROMPT, PROMPT + DECODE):
        got.append(model(seq[i : i + 1], cache))
    got = torch.cat(got)
    assert got.dtype == torch.float32 and got.shape == (PROMPT + DECODE, VOCAB)
    assert cache.length == PROMPT + DECODE
    assert ref.abs().max() > 0.5  # the bound below means something
    assert (got - ref).abs().max().item() < ATOL


def test_greedy_ids_match_generate(pair):
    hf, model, _ = pair
    prompt = ids(PROMPT, seed=2)
    with torch.no_grad():
        out = hf.generate(prompt[None], max_new_tokens=DECODE, do_sample=False, pad_token_id=0)
    ref = out[0, PROMPT:].tolist()
    cache = model.new_cache(64)
    logits = model(prompt, cache, num_logits=1)
    mine = []
    for _ in range(DECODE):
        mine.append(int(logits[-1].argmax()))
        logits = model(torch.tensor([mine[-1]]), cache)
    assert mine == ref


def test_num_logits_and_multi_token_equals_single_steps(pair):
    _, model, _ = pair
    seq = ids(PROMPT + 8, seed=3)
    a = model.new_cache(64)
    full = model(seq[:PROMPT], a)
    last = model(seq[:PROMPT], model.new_cache(64), num_logits=1)
    assert last.shape == (1, VOCAB) and torch.allclose(last, full[-1:], atol=1e-6)
    block = model(seq[PROMPT:], a)  # T = 8 at once on a warm cache
    b = model.new_cache(64)
    model(seq[:PROMPT], b)
    steps = torch.cat([model(seq[i : i + 1], b) for i in range(PROMPT, PROMPT + 8)])
    assert a.length == b.length == PROMPT + 8
    assert (block - steps).abs().max().item() < 1e-5


def test_truncate_rolls_back(pair):
    _, model, _ = pair
    seq, other = ids(PROMPT + 5, seed=4), ids(5, seed=5)
    cache = model.new_cache(64)
    model(seq[:PROMPT], cache)
    first = model(seq[PROMPT:], cache)
    cache.truncate(PROMPT)
    model(other, cache)  # a rejected draft overwrites the tail
    cache.truncate(PROMPT)
    again = model(seq[PROMPT:], cache)
    assert torch.equal(first, again)


def test_skip(pair):
    hf, model, _ = pair
    n = model.config.n_layers
    seq = ids(PROMPT, seed=6)
    plain = model(seq, model.new_cache(64))
    empty = model(seq, model.new_cache(64), skip=Skip())
    assert torch.equal(plain, empty)

    cache = model.new_cache(64)
    everything = Skip(attn=frozenset(range(n)), mlp=frozenset(range(n)))
    got = model(seq, cache, skip=everything)
    with torch.no_grad():  # the model without its blocks: final norm + head of the embedding
        ref = hf.lm_head(hf.model.norm(hf.model.embed_tokens(seq[None])))[0]
        cap = getattr(hf.config, "final_logit_softcapping", None)
        if cap:
            ref = torch.tanh(ref / cap) * cap
    assert (got - ref).abs().max().item() < ATOL
    assert cache.length == PROMPT
    assert all(k.abs().sum() == 0 for k in cache.k)  # skipped attention writes no KV

    cache = model.new_cache(64)
    model(seq, cache, skip=Skip(attn={1}, mlp={2}))  # sets are accepted and frozen
    assert cache.k[1].abs().sum() == 0 and cache.k[0].abs().sum() > 0


def test_view_of_all_positions_equals_no_view(pair):
    _, model, _ = pair
    seq = ids(PROMPT + 3, seed=7)
    a, b, c = (model.new_cache(64) for _ in range(3))
    for cache in (a, b, c):
        model(seq[:PROMPT], cache)
    plain = model(seq[PROMPT:], a)
    everything = torch.arange(PROMPT)
    viewed = model(seq[PROMPT:], b, view=everything)
    per_layer = model(seq[PROMPT:], c, view={i: everything for i in range(model.config.n_layers)})
    assert (plain - viewed).abs().max().item() < 1e-5
    assert (plain - per_layer).abs().max().item() < 1e-5

    # a real subset changes the answer and still advances the cache by T
    d = model.new_cache(64)
    model(seq[:PROMPT], d)
    sparse = model(seq[PROMPT:], d, view=torch.arange(0, PROMPT, 3))
    assert d.length == PROMPT + 3 and not torch.allclose(sparse, plain)
    with pytest.raises(VeridraftError, match="view positions"):
        model(seq[PROMPT:], d, view=torch.tensor([0, PROMPT + 3]))  # not cached yet
    assert d.length == PROMPT + 3


def test_capture_hidden_states(pair):
    hf, model, _ = pair
    n = model.config.n_layers
    seq = ids(PROMPT, seed=8)
    cap = Capture(hidden_layers=(0, n - 1, -1))
    logits = model(seq, model.new_cache(64), capture=cap, num_logits=2)
    assert logits.shape == (2, VOCAB)
    assert set(cap.hidden) == {0, n - 1, -1}
    assert all(h.shape == (PROMPT, model.config.dim) for h in cap.hidden.values())
    with torch.no_grad():
        hs = hf(seq[None], output_hidden_states=True).hidden_states
    assert (cap.hidden[0] - hs[1][0]).abs().max().item() < ATOL  # output of block 0
    assert (cap.hidden[-1] - hs[-1][0]).abs().max().item() < ATOL  # final normed hidden


def test_config_fields(pair):
    hf, model, _ = pair
    c = model.config
    assert c.n_layers == 4 and c.vocab_size == VOCAB and c.dim == 64
    assert c.head_dim == getattr(hf.config, "head_dim", 64 // 4)
    assert c.tie_embeddings == hf.config.tie_word_embeddings
    if c.tie_embeddings:
        assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    types = getattr(hf.config, "layer_types", None) or ["full_attention"] * 4
    windows = [WINDOW if t == "sliding_attention" else None for t in types]
    if c.model_type == "mistral":
        windows = [WINDOW] * 4
    assert any(windows) == (c.model_type in ("mistral", "qwen2", "gemma3_text"))
    assert c.layer_windows == windows


# ---- config reading and errors ----


def test_old_gemma_config_layout():
    old = {
        "model_type": "gemma3_text",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 6,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 4,
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "eos_token_id": [1, 106],
    }
    c = ModelConfig.from_hf(old)
    assert c.arch == "gemma3" and c.eos_token_ids == [1, 106]
    assert c.rope["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert c.rope["sliding_attention"]["rope_theta"] == 1e4
    assert c.layer_windows == [512] * 5 + [None]
    assert c.attn_scale == 256**-0.5 and c.tie_embeddings


def test_errors(pair, tmp_path):
    _, _, folder = pair
    with pytest.raises(VeridraftError, match="not a model folder"):
        from_folder(tmp_path)
    with pytest.raises(VeridraftError, match="unknown precision"):
        from_folder(folder, precision="int3")
    with pytest.raises(VeridraftError, match="supported: llama"):
        ModelConfig.from_hf({"model_type": "gpt2", "hidden_size": 8})

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((Path(folder) / "config.json").read_text())
    raw = (Path(folder) / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VeridraftError, match=r"model\.safetensors.*re-pull") as e:
        from_folder(bad)
    assert "\n" not in str(e.value)

    from safetensors.torch import load_file, save_file

    sd = load_file(Path(folder) / "model.safetensors")
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(VeridraftError, match="model.layers.1.mlp.up_proj.weight"):
        from_folder(bad)

    cfg = json.loads((Path(folder) / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VeridraftError, match="unsupported model_type 'falcon'"):
        from_folder(bad)


def test_bf16_rows_do_not_depend_on_the_number_of_rows(tmp_path):
    """In bf16 a T-token forward gives, row for row, bitwise the logits of T one-token forwards:
    this is what keeps speculative decoding exact in that mode. Needs row-wise attention (SDPA's
    float32 noise, rounded to bf16, moved real-model logits) and K padded to oneDNN's tiles
    (intermediate size 112 here: without the padding rows differ from M = 2 on)."""
    cfg = transformers.Gemma3TextConfig(
        **{**COMMON, "hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 3},
        head_dim=64,
        sliding_window=40,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(tmp_path)
    net = from_folder(tmp_path, precision="bf16")
    prompt, n = 60, 12
    tokens = ids(prompt + n, seed=3)
    cache = net.new_cache(128)
    net(tokens[:prompt], cache)
    one = torch.cat([net(tokens[prompt + i : prompt + i + 1], cache) for i in range(n)])
    same = []
    for t in (2, 5, 12):
        cache.truncate(prompt)
        same.append(torch.equal(net(tokens[prompt : prompt + t], cache), one[:t]))
    assert all(same), same
