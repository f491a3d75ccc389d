"""The chat path: messages with images and videos -> ids, segments and generation, on a tiny
random Qwen2.5-VL with the released models' token ids and a Qwen2.5 tokenizer (the catalog's
qwen2.5-coder-0.5b files, which hold the vision tokens)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import make_hf

from veridraft import models, multimodal
from veridraft.errors import VeridraftError
from veridraft.loader import load
from veridraft.vision import processor as P
from veridraft.vision.chat import check_drafter, prepare

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

QUESTION = "What moves in the video, and what colour is the picture?"
VOCAB = 151936  # the Qwen2.5 tokenizer's ids, vision pads included


def make_folder(tmp_path_factory, real_model_dir, name: str, seed: int):
    src = real_model_dir("qwen2.5-coder-0.5b")
    out = tmp_path_factory.mktemp(name)
    hf = make_hf("qwen2_5_vl", seed, tokens={}, vocab_size=VOCAB)
    hf.save_pretrained(out)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / file, out / file)
    return hf, out


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, real_model_dir):
    hf, folder = make_folder(tmp_path_factory, real_model_dir, "vl_chat", 11)
    model = load(folder, precision="fp32")
    model.net.text_after_vision = "spatial"  # as transformers 5 (the reference here)
    return hf, model


@pytest.fixture(scope="module")
def messages(tmp_path_factory, sample_video):
    path = tmp_path_factory.mktemp("media") / "odd.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (75, 131, 3), dtype=np.uint8)).save(path)
    return [
        {"role": "system", "content": "You describe media."},
        {
            "role": "user",
            "content": [
                {
                    "type": "video",
                    "video": str(sample_video),
                    "fps": 2.0,
                    "min_pixels": 4 * 784,
                    "max_pixels": 30 * 784,
                },
                {"type": "image", "image": str(path), "max_pixels": 20 * 784},
                {"type": "text", "text": QUESTION},
            ],
        },
    ]


def test_prompt_ids_and_segments(chat_model, messages):
    _, model = chat_model
    mp = prepare(model, messages)
    tok = model.tokenizer
    text = P.expand_vision_pads(P.chat_text(messages), mp.inputs)
    assert mp.ids == tok.encode(text, add_special_tokens=False)
    kinds = {k: (a, b) for k, a, b in mp.segments}
    assert set(kinds) == {"system", "video", "image", "question"}
    for kind, pad in (("video", P.VIDEO_PAD_ID), ("image", P.IMAGE_PAD_ID)):
        a, b = kinds[kind]
        assert mp.ids[a - 1] == P.VISION_START_ID and mp.ids[b] == P.VISION_END_ID
        assert b - a == mp.counts[kind] == mp.ids.count(pad)
    a, b = kinds["question"]
    assert tok.decode(mp.ids[a:b]) == QUESTION
    assert tok.decode(mp.ids[slice(*kinds["system"])]) == "You describe media."


@pytest.mark.slow
def test_generation_equals_transformers_and_drafting_is_lossless(chat_model, messages):
    hf, model = chat_model
    mp = prepare(model, messages)
    video, image = mp.inputs
    ids = torch.tensor([mp.ids])
    types = torch.zeros_like(ids)
    types[ids == P.IMAGE_PAD_ID], types[ids == P.VIDEO_PAD_ID] = 1, 2
    hf.model.rope_deltas = None
    with torch.no_grad():
        want = hf.generate(
            input_ids=ids,
            mm_token_type_ids=types,
            pixel_values=image.pixel_values,
            image_grid_thw=torch.tensor([image.grid_thw]),
            pixel_values_videos=video.pixel_values,
            video_grid_thw=torch.tensor([video.grid_thw]),
            second_per_grid_ts=torch.tensor([video.second_per_grid]),
            max_new_tokens=10,
            do_sample=False,
        )[0, len(mp.ids) :].tolist()
    plain = multimodal.generate(model, messages, max_new_tokens=10, draft=None, eos_ids=())
    assert plain.ids == want and plain.prompt_ids == mp.ids
    for spec in ("pruned", "streaming:budget=64", "ngram"):
        out = multimodal.generate(model, messages, max_new_tokens=10, draft=spec, eos_ids=())
        assert out.ids == want, spec
    assert model.net.prompt is None  # generation leaves the model as it found it


def test_a_text_only_draft_model_is_refused_in_one_line(chat_model, messages):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from veridraft.drafters.streaming import StreamingDrafter

    _, model = chat_model
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    hf_text = Qwen2ForCausalLM(cfg).eval()
    text_net = models.from_hf_config_and_state_dict(cfg.to_dict(), hf_text.state_dict())
    drafter = StreamingDrafter(text_net)
    with pytest.raises(VeridraftError) as e:
        multimodal.generate(model, messages, max_new_tokens=4, draft=drafter)
    assert "text-only model" in str(e.value) and "\n" not in str(e.value)
    check_drafter(StreamingDrafter(None))  # drafting on the target itself is fine


def test_a_text_model_cannot_prepare_media(real_model, messages):
    with pytest.raises(VeridraftError, match="text-only model and cannot read images or video"):
        prepare(real_model("qwen2.5-coder-0.5b"), messages)


@pytest.mark.slow
def test_a_multimodal_draft_model_reads_the_media_through_its_own_tower(
    chat_model, messages, tmp_path_factory, real_model_dir
):
    """model:FOLDER with another Qwen2.5-VL: lossless, and its prompt forward runs with a
    VisionPrompt of its own (its tower's rows, not the target's)."""
    from veridraft.drafters import make_drafter

    _, model = chat_model
    _, draft_folder = make_folder(tmp_path_factory, real_model_dir, "vl_draft", 12)
    drafter = make_drafter(f"model:{draft_folder}", model)
    dnet, seen = drafter.net, []
    embed = dnet.embed

    def spy(tokens):
        seen.append(dnet.prompt)
        return embed(tokens)

    dnet.embed = spy
    plain = multimodal.generate(model, messages, max_new_tokens=10, draft=None, eos_ids=())
    out = multimodal.generate(model, messages, max_new_tokens=10, draft=drafter, eos_ids=())
    assert out.ids == plain.ids and out.stats.drafted > 0
    target_rows = prepare(model, messages).vision.embeds
    assert seen and seen[0] is not None and seen[0].embeds.shape == target_rows.shape
    assert not torch.equal(seen[0].embeds, target_rows)


@pytest.mark.slow
def test_presses_and_loose_verification_report_their_fidelity(chat_model, messages):
    """The lossy methods run on the multimodal prompt and say what they are: presses their KV
    memory (M-RoPE keys re-rotated by slot in mm-shiftkv), loose verification its relaxations."""
    _, model = chat_model
    plain = multimodal.generate(model, messages, max_new_tokens=8, draft=None, eos_ids=())
    for kv in ("snapkv:budget=0.25", "mm-shiftkv:budget=0.25", "hybridkv:budget=0.25"):
        out = multimodal.generate(model, messages, max_new_tokens=8, kv=kv, eos_ids=())
        assert "(lossy)" in out.stats.method and len(out.ids) == len(plain.ids)
        assert any("KV memory held" in n for n in out.stats.notes), kv
    loose = multimodal.generate(
        model, messages, max_new_tokens=8, draft="ngram+loose:topk=5", eos_ids=()
    )
    assert loose.stats.lossy and loose.stats.verify.startswith("loose")
