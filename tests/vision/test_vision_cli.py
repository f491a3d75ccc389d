"""`veridraft models list` names the architectures that read images and video."""

from __future__ import annotations

from veridraft.cli import main


def test_models_list_names_the_multimodal_architectures(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path))  # an empty store: the catalog rows only
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    text = next(line for line in out if line.startswith("architectures"))
    multi = next(line for line in out if "multimodal" in line)
    assert "qwen2_5_vl" in multi and "qwen2_vl" in multi and "llama" not in multi
    assert "llama" in text and "qwen2_vl" not in text


def test_models_alone_lists(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path))
    assert main(["models", "list"]) == 0
    listed = capsys.readouterr().out
    assert main(["models"]) == 0
    assert capsys.readouterr().out == listed and "multimodal" in listed
