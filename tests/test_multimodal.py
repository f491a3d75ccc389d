"""veridraft.generate with chat messages that hold images or video: routed to the multimodal
path (the same ids as veridraft.multimodal.generate called directly, drafting lossless), with
stop strings and streaming; on a tiny Qwen2.5-VL loaded from its GGUF + mmproj pair (no
download: tests/models/mmproj_helpers.py writes it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import veridraft
from veridraft import multimodal
from veridraft.errors import VeridraftError
from veridraft.models import catalog

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "mmproj_helpers", Path(__file__).parent / "models" / "mmproj_helpers.py"
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    _, gguf, proj = H.write_pair(H.make_hf_model("qwen2_5_vl", 5), out, "qwen2_5_vl")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(catalog, "models_dir", lambda: out / "models")
        model = veridraft.load(gguf, precision="fp32", mmproj=proj)
        model.files = (gguf, proj)  # for the command line's test
        yield model


@pytest.fixture(scope="module")
def messages(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "odd.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (75, 131, 3), dtype=np.uint8)).save(path)
    frames = list(rng.integers(0, 256, (4, 60, 90, 3), dtype=np.uint8))
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(path), "max_pixels": 20 * 784},
                {"type": "video", "video": frames, "fps": 2.0, "max_pixels": 12 * 784},
                {"type": "text", "text": "he he"},
            ],
        }
    ]


def test_generate_routes_media_to_the_multimodal_path(model, messages):
    want = multimodal.generate(model, messages, max_new_tokens=12, eos_ids=())
    assert H.IMAGE in want.prompt_ids and H.VIDEO in want.prompt_ids
    for draft in (None, "auto", "ngram"):  # drafting stays lossless on the routed path
        got = veridraft.generate(model, messages, max_new_tokens=12, draft=draft, eos_ids=())
        assert got.prompt_ids == want.prompt_ids
        assert got.ids == want.ids, draft
        assert got.text == want.text
    assert len(want.ids) == 12


def test_stop_and_stream_with_media(model, messages):
    full = veridraft.generate(model, messages, max_new_tokens=24, eos_ids=())
    stop = next(c for c in full.text[1:] if c.isascii() and c.isprintable())
    pieces: list[str] = []
    cut = veridraft.generate(
        model, messages, max_new_tokens=24, eos_ids=(), stop=stop, stream=pieces.append
    )
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert "".join(pieces) == cut.text
    assert cut.ids == full.ids[: len(cut.ids)]


def test_media_with_chat_false_is_a_one_line_error(model, messages):
    with pytest.raises(VeridraftError, match="chat=False") as e:
        veridraft.generate(model, messages, chat=False)
    assert "\n" not in str(e.value)


def test_a_text_prompt_on_the_vision_model_runs_as_text(model):
    """No media: the text path, the model's plain greedy ids (a fresh prefill per token)."""
    gen = veridraft.generate(model, "he he", max_new_tokens=6, draft=None, eos_ids=())
    ids = list(gen.prompt_ids)
    for _ in range(6):
        with torch.inference_mode():
            out = model.net(torch.tensor(ids), model.net.new_cache(len(ids) + 1), num_logits=1)
        ids.append(int(out[-1].argmax()))
    assert gen.ids == ids[len(gen.prompt_ids) :]


def test_the_command_line_reads_images_and_the_mmproj(model, messages, capsys):
    from veridraft.cli import main

    image = messages[0]["content"][0]["image"]
    content = [{"type": "image", "image": image}, {"type": "text", "text": "he he"}]
    want = veridraft.generate(model, [{"role": "user", "content": content}], 8, draft=None)
    gguf, proj = model.files
    argv = ["generate", "he he", "-m", str(gguf), "--mmproj", str(proj), "-n", "8"]
    argv += ["--draft", "none", "--precision", "fp32"]
    assert main([*argv, "--image", image]) == 0
    out = capsys.readouterr().out
    assert out == want.text + "\n"
    assert main(argv) == 0  # the same prompt without the image: the text path, other text
    assert capsys.readouterr().out != out
