"""veridraft drafter spec -> vLLM speculative_config, and `veridraft serve --print-vllm-config`."""

from __future__ import annotations

import json
import shlex

import pytest

from veridraft import VeridraftError
from veridraft.cli import main
from veridraft.serve.vllm import speculative_config, vllm_command


def test_ngram_defaults_are_written_out():
    cfg, notes = speculative_config("ngram")
    assert cfg == {
        "method": "ngram",
        "num_speculative_tokens": 10,
        "prompt_lookup_max": 3,
        "prompt_lookup_min": 1,
    }
    assert any("num_tokens not given" in n for n in notes)


def test_ngram_parameters_and_aliases():
    cfg, _ = speculative_config("ngram:num_tokens=5,max_ngram=4,min_ngram=2")
    assert cfg == {
        "method": "ngram",
        "num_speculative_tokens": 5,
        "prompt_lookup_max": 4,
        "prompt_lookup_min": 2,
    }
    # vLLM's and HF's own names are aliases of ours.
    cfg2, _ = speculative_config("ngram:k=5,prompt_lookup_max=4,prompt_lookup_min=2")
    assert cfg2 == cfg
    _, notes = speculative_config("ngram:k=5,match=first")
    assert any("match" in n and "dropped" in n for n in notes)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ngram:bogus=1", "unknown parameter"),
        ("ngram:k=0", ">= 1"),
        ("ngram:k=x", "integer"),
        ("ngram:min_ngram=4,max_ngram=2", "min_ngram"),
        ("layerskip", "no vLLM equivalent"),
        ("universal:gemma3-270m", "no vLLM equivalent"),
        ("model:smollm2-135m-l8", "truncated"),
        ("model", "needs a draft model"),
        ("nosuch", "unknown draft method"),
    ],
)
def test_unmappable_specs_say_why(spec, message):
    with pytest.raises(VeridraftError, match=message):
        speculative_config(spec)


def test_draft_model_uses_hub_ids():
    cfg, notes = speculative_config("model:qwen2.5-coder-0.5b:k=4,mode=fixed")
    assert cfg == {
        "method": "draft_model",
        "model": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        "num_speculative_tokens": 4,
    }
    assert notes == []
    cfg, notes = speculative_config("model:/models/draft")
    assert cfg["model"] == "/models/draft" and cfg["num_speculative_tokens"] == 16
    assert any("dynamic" in n for n in notes)


def test_suffix():
    cfg, notes = speculative_config("suffix:max_tree_depth=16")
    assert cfg == {"method": "suffix", "suffix_decoding_max_tree_depth": 16}
    assert any("arctic-inference" in n for n in notes)


def test_vllm_command_round_trips():
    cmd, _ = vllm_command("qwen2.5-coder-1.5b", "model:qwen2.5-coder-0.5b:k=4,mode=fixed")
    argv = shlex.split(cmd)
    assert argv[:3] == ["vllm", "serve", "Qwen/Qwen2.5-Coder-1.5B-Instruct"]
    cfg = json.loads(argv[argv.index("--speculative-config") + 1])
    assert cfg["method"] == "draft_model" and cfg["num_speculative_tokens"] == 4


def test_cli_print_vllm_config(capsys):
    assert main(["serve", "--draft", "ngram:k=4", "--print-vllm-config"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["num_speculative_tokens"] == 4
    assert "vllm serve HuggingFaceTB/SmolLM2-135M-Instruct" in err
    assert main(["serve", "--draft", "layerskip", "--print-vllm-config"]) == 2
    assert "no vLLM equivalent" in capsys.readouterr().err
    assert main(["serve", "--print-vllm-config"]) == 2
