"""Shared fixtures. The catalog models are pulled on first use (`make test` pulls them before
pytest), into $VERIDRAFT_HOME (default ~/.cache/veridraft); nothing is skipped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The shared helpers (tiny random models, exact distributions, chi-square) live beside the drafter
# tests; every test folder imports them by name.
sys.path.insert(0, str(Path(__file__).parent / "drafters"))

REAL_FIXTURES = {"real_model_dir", "real_model"}


def pytest_collection_modifyitems(items):
    """`real` follows from the fixtures: a test that reaches the catalog models (directly or
    through another fixture) is marked, so `-m "not real"` never needs a download."""
    for item in items:
        if REAL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def real_model_dir():
    """Callable: catalog name -> pulled model folder (pulls when missing).

    It follows $VERIDRAFT_HOME at call time: call it before monkeypatching that variable.
    """
    from veridraft.models.catalog import pull

    return pull


@pytest.fixture(scope="session")
def real_model():
    """Callable: catalog name -> LoadedModel, loaded once per name for the whole session."""
    from veridraft.loader import load

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load(name, precision="fp32")  # the reference mode
        return cache[name]

    return get


@pytest.fixture(scope="session")
def plain_greedy():
    """Callable: (LoadedModel, prompt ids, max_new_tokens) -> plain greedy decoding's ids.

    Several modules check drafters against the same plain-decoding outputs of the catalog
    models, the most expensive part of those tests; each is computed once per pytest session.
    A reference is reused only for the same model name and precision, prompt, length and torch
    thread count, so it is exactly what the test would have computed itself.
    """
    import torch

    from veridraft.decode import decode
    from veridraft.sampling import SamplingParams

    cache: dict[tuple, list[int]] = {}

    def get(model, prompt, max_new_tokens: int) -> list[int]:
        key = (model.name, model.precision, tuple(prompt), max_new_tokens)
        key += (torch.get_num_threads(),)
        if key not in cache:
            cache[key], _ = decode(
                model.net,
                list(prompt),
                max_new_tokens=max_new_tokens,
                sampling=SamplingParams(),
                generator=torch.Generator(),
            )
        return list(cache[key])

    return get


@pytest.fixture
def one_thread(request):
    """Torch on one thread for the test: thousands of tiny ops, where OpenMP wake-ups on a busy
    two-core machine would cost more than the work (modules opt in with `usefixtures`). Tests
    marked `real` keep the session's threads: a catalog model's matmuls use both cores (on one,
    the real-model cases of such a module took twice as long)."""
    import torch

    n = torch.get_num_threads()
    if request.node.get_closest_marker("real") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_smollm2_dir(tmp_path_factory, real_model_dir):
    """Callable: (folder name, layers, positions) -> a new folder holding a random Llama (seed 0)
    with SmolLM2's vocabulary and tokenizer files: fast forwards, but real text in and out."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(name: str, layers: int = 2, positions: int = 256) -> Path:
        src = real_model_dir("smollm2-135m")
        out = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=49152,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=positions,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        )
        LlamaForCausalLM(cfg).eval().save_pretrained(out)
        for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / file).exists():
                shutil.copy(src / file, out / file)
        return out

    return make
