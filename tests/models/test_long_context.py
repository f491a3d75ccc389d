"""Long prompts: tiled causal prefill vs transformers, chunked prefill vs one block, exact
speculative decoding past several attention tiles, the one-row GQA decode kernel, and the
context-limit errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from veridraft.bench import long
from veridraft.data.books import read_lines
from veridraft.decode import decode, prefill, run_prompt
from veridraft.drafters import make_drafter
from veridraft.errors import VeridraftError
from veridraft.generate import generate_ids
from veridraft.models import from_folder
from veridraft.models.base import PREFILL_TILE
from veridraft.sampling import SamplingParams

VOCAB = 64
LONG = 2 * PREFILL_TILE + 300  # three attention tiles, the last one partial
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=96,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    initializer_range=0.15,
)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **COMMON,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=200,  # windows end inside tiles and span tile boundaries
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIGS[request.param]()).float().eval()
    hf.generation_config.eos_token_id = None
    folder = tmp_path_factory.mktemp(f"long-{request.param}")
    hf.save_pretrained(folder)
    return hf, folder


def ids(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def test_long_prefill_matches_transformers(pair):
    """Tiled causal attention (a log-sum-exp merge on global layers, band masks on sliding ones)
    gives transformers' logits at every one of LONG positions, chunked or not."""
    hf, folder = pair
    net = from_folder(folder)
    seq = ids(LONG)
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0].float()
    whole = net(torch.tensor(seq), net.new_cache(LONG))
    cache = net.new_cache(LONG)
    parts = [net(torch.tensor(seq[a : a + 384]), cache) for a in range(0, LONG, 384)]
    assert ref.abs().max() > 0.5
    assert (whole - ref).abs().max().item() < 1e-4
    assert (torch.cat(parts) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("precision", ["bf16", "fp16w"])
def test_chunked_prefill_is_bitwise_one_block_in_packed_modes(pair, precision):
    _, folder = pair
    net = from_folder(folder, precision=precision)
    seq = ids(LONG, seed=2)
    one = prefill(net, seq, LONG + 8, chunk=None)
    chunked = prefill(net, seq, LONG + 8, chunk=PREFILL_TILE)
    assert torch.equal(one.logits, chunked.logits)
    for layer in range(net.config.n_layers):
        assert torch.equal(one.cache.k[layer][:, :, :LONG], chunked.cache.k[layer][:, :, :LONG])
        assert torch.equal(one.cache.v[layer][:, :, :LONG], chunked.cache.v[layer][:, :, :LONG])


def test_chunked_prefill_in_fp32_within_rounding(pair):
    """float32 matmuls (MKL) pick kernels by the number of rows, so a chunk's rows may differ
    from the one-block rows in the last bits: equal within rounding, not bitwise."""
    _, folder = pair
    net = from_folder(folder)
    seq = ids(LONG, seed=3)
    one = prefill(net, seq, LONG, chunk=None)
    chunked = prefill(net, seq, LONG, chunk=PREFILL_TILE)
    assert (one.logits - chunked.logits).abs().max().item() < 1e-5


def test_chunk_bounds_keep_short_tails_with_the_chunk_before():
    calls = []

    class Recorder:
        def __call__(self, tokens, cache, num_logits=None):
            calls.append(len(tokens))
            return torch.zeros(1, 4)

    for n, want in [(100, [100]), (1088, [1088]), (1100, [1024, 76]), (2100, [1024, 1076])]:
        calls.clear()
        run_prompt(Recorder(), list(range(n)), None, chunk=1024)
        assert calls == want, n
    with pytest.raises(VeridraftError, match="chunk"):
        run_prompt(Recorder(), [1, 2], None, chunk=-1)


@pytest.mark.parametrize(
    "precision,draft", [("bf16", "ngram"), ("bf16", "layerskip:attn=1,mlp=1"), ("fp16w", "ngram")]
)
def test_greedy_speculative_equals_plain_past_several_tiles(pair, precision, draft):
    _, folder = pair
    net = from_folder(folder, precision=precision)
    # a repeated phrase, so that the ngram drafter finds matches to propose
    phrase = ids(37, seed=4)
    prompt = (phrase * (LONG // len(phrase) + 1))[:LONG]

    def run(drafter):
        return decode(
            net,
            prompt,
            max_new_tokens=16,
            sampling=SamplingParams(),
            generator=torch.Generator(),
            drafter=drafter,
        )

    plain, _ = run(None)
    spec, stats = run(make_drafter(draft, net))
    assert spec == plain
    assert stats.drafted > 0


def test_one_row_gqa_kernel_equals_repeated_heads():
    """Decode's one-row kernel (the q heads of a kv group as its rows) computes SDPA with the
    kv heads repeated, in both cache types."""
    from veridraft.models.attention import attend_keys

    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        q = torch.randn(1, 6, 1, 16, generator=g)
        k = torch.randn(1, 2, 300, 16, generator=g).to(dtype)
        v = torch.randn(1, 2, 300, 16, generator=g).to(dtype)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k.float().repeat_interleave(3, 1), v.float().repeat_interleave(3, 1), scale=0.25
        )
        got = attend_keys(q, k, v, None, 0.25, None)
        assert got.dtype == torch.float32 and got.shape == (1, 96)
        assert (got - ref[0].transpose(0, 1).reshape(1, -1)).abs().max().item() < tol


def test_bfloat16_cache_keeps_speculative_decoding_exact(pair):
    _, folder = pair
    net = from_folder(folder, precision="bf16")
    net.cache_dtype = torch.bfloat16
    assert net.new_cache(4).k[0].dtype == torch.bfloat16
    phrase = ids(29, seed=5)
    prompt = (phrase * 40)[:600]
    kw = dict(max_new_tokens=12, sampling=SamplingParams(), generator=torch.Generator())
    plain, _ = decode(net, prompt, **kw)
    spec, stats = decode(net, prompt, drafter=make_drafter("ngram", net), **kw)
    assert spec == plain and stats.drafted > 0


@pytest.fixture
def prompt_kernel():
    from veridraft.models import attnkernel

    if attnkernel.load() is None:
        pytest.skip("this CPU has no AVX512-BF16: prompts keep torch's attention")
    return attnkernel


def test_prompt_rows_through_the_kernel_are_one_token_steps(pair, prompt_kernel, monkeypatch):
    # VERIDRAFT_PROMPT_ATTN=kernel: a prompt's rows, in one forward or in chunks, are bitwise
    # what one-token forwards at their positions compute, in sliding-window layers too
    _, folder = pair
    monkeypatch.setenv("VERIDRAFT_PROMPT_ATTN", "kernel")
    net = from_folder(folder, precision="bf16")
    net.cache_dtype = torch.bfloat16
    assert prompt_kernel.for_prompts(torch.bfloat16)
    prompt = ids(600, seed=7)
    with torch.inference_mode():
        whole = net(torch.tensor(prompt), net.new_cache(610), num_logits=len(prompt))
        cache = net.new_cache(610)
        net(torch.tensor(prompt[:100]), cache, num_logits=1)
        steps = [net(torch.tensor([i]), cache, num_logits=1)[0] for i in prompt[100:140]]
        chunked = prefill(net, prompt, 610, chunk=256).logits
    assert torch.equal(torch.stack(steps), whole[100:140])
    assert torch.equal(chunked, whole[-1])


def test_prompt_rows_through_the_kernel_are_as_close_to_fp32_as_torchs(
    pair, prompt_kernel, monkeypatch
):
    # the kernel's bfloat16 arithmetic against torch's tiled flash attention on one bf16 cache,
    # both measured against the float32 model
    _, folder = pair
    prompt = torch.tensor(ids(LONG, seed=8))
    with torch.inference_mode():
        fp32 = from_folder(folder)
        ref = fp32(prompt, fp32.new_cache(LONG), num_logits=LONG)
    net = from_folder(folder, precision="bf16")
    net.cache_dtype = torch.bfloat16
    err, agree, out = {}, {}, {}
    for choice in ("kernel", "torch"):
        monkeypatch.setenv("VERIDRAFT_PROMPT_ATTN", choice)
        with torch.inference_mode():
            out[choice] = net(prompt, net.new_cache(LONG), num_logits=LONG)
        err[choice] = (out[choice] - ref).abs().mean().item()
        agree[choice] = (out[choice].argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert not torch.equal(out["kernel"], out["torch"])  # the two paths really ran
    assert err["kernel"] < 1.25 * err["torch"], err
    assert agree["kernel"] > agree["torch"] - 0.02, agree


def test_a_bad_prompt_attention_choice_is_a_clear_error(prompt_kernel, monkeypatch):
    monkeypatch.setenv("VERIDRAFT_PROMPT_ATTN", "flash")
    with pytest.raises(VeridraftError, match="VERIDRAFT_PROMPT_ATTN='flash'"):
        prompt_kernel.for_prompts(torch.bfloat16)
    monkeypatch.setenv("VERIDRAFT_PROMPT_ATTN", "torch")
    assert not prompt_kernel.for_prompts(torch.bfloat16)
    monkeypatch.delenv("VERIDRAFT_PROMPT_ATTN")
    assert not prompt_kernel.for_prompts(torch.float32)  # float32 caches keep torch's tiles


def test_context_limit_errors(pair):
    _, folder = pair
    net = from_folder(folder)
    limit = net.config.max_position_embeddings
    with pytest.raises(VeridraftError, match=r"exceeds the context length.*max_new_tokens"):
        generate_ids(net, ids(limit - 10), max_new_tokens=11)
    with pytest.raises(VeridraftError, match="KV cache full"):
        run_prompt(net, ids(100), net.new_cache(50), chunk=32)


@pytest.fixture(scope="module")
def smollm2_bf16(real_model_dir):
    from veridraft.loader import load

    real_model_dir("smollm2-135m")
    model = load("smollm2-135m", precision="bf16")
    book = json.loads(read_lines(long.default_data_path())[0])
    text = "\n\n".join(f"{c['title']}\n\n{c['text']}" for c in book["chapters"][:4])
    return model, model.tokenizer.encode(text)[:1700]


@pytest.mark.slow
def test_smollm2_chunked_prefill_is_bitwise_one_block(smollm2_bf16):
    model, prompt = smollm2_bf16
    one = prefill(model.net, prompt, len(prompt) + 1, chunk=None)
    chunked = prefill(model.net, prompt, len(prompt) + 1)  # the default chunk: 1024, then 676
    assert torch.equal(one.logits, chunked.logits)
    assert torch.equal(one.cache.k[-1], chunked.cache.k[-1])


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["ngram", "layerskip"])
@pytest.mark.filterwarnings("ignore:layerskip")
def test_smollm2_greedy_speculative_equals_plain_after_two_chunks(
    smollm2_bf16, plain_greedy, draft
):
    model, prompt = smollm2_bf16
    out, stats = decode(
        model.net,
        prompt,
        max_new_tokens=48,
        sampling=SamplingParams(),
        generator=torch.Generator(),
        drafter=make_drafter(draft, model),
    )
    assert out == plain_greedy(model, prompt, 48)
    assert stats.drafted > 0
