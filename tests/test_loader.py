"""load(): routing (catalog name, GGUF file, HF folder, hub id), errors, LoadedModel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from veridraft.errors import VeridraftError
from veridraft.loader import LoadedModel, list_models, load
from veridraft.models import catalog, convert


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_name_lists_known_ones():
    with pytest.raises(VeridraftError) as e:
        load("llama-9000")
    msg = _one_line(e)
    assert "unknown model 'llama-9000'" in msg
    assert "smollm2-135m" in msg and "gemma3-270m" in msg and "GGUF" in msg


def test_text_file_is_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(VeridraftError) as e:
        load(f)
    assert _one_line(e) == (
        f"{f} is not a model: expected a GGUF file or a folder with config.json"
    )


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(VeridraftError, match="is not a model"):
        load(str(tmp_path))


def test_missing_gguf_path(tmp_path):
    with pytest.raises(VeridraftError, match="does not exist"):
        load(str(tmp_path / "missing.gguf"))


def test_corrupt_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path / "vd"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(VeridraftError, match="is not a valid GGUF file"):
        load(bad)
    models = tmp_path / "vd" / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_hub_id_when_hub_unreachable(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(VeridraftError) as e:
        load("someorg/some-model")
    msg = _one_line(e)
    assert "'someorg/some-model'" in msg and "hub is unreachable" in msg


def test_gguf_file_is_read_once_and_runs_as_it_is(tmp_path, monkeypatch, real_model_dir):
    """The GGUF route: its config and tokenizer read out once into a small gguf-<sha16> folder;
    q4 runs the file where it is (no float32 copy); a moved file is found again."""
    from veridraft.models import q4kernel

    src = real_model_dir("smollm2-135m")  # before VERIDRAFT_HOME moves to tmp_path
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path / "vd"))
    gguf = tmp_path / "my-model.gguf"
    shutil.copy(src / "source.gguf", gguf)
    calls = []

    def fake_metadata(path, out_dir, **kwargs):  # transformers' reading is faked: routing only
        calls.append(Path(path))
        for f in src.iterdir():
            if f.is_file() and f.suffix in (".json", ".jinja") and f.name != "veridraft.json":
                shutil.copy(f, out_dir / f.name)
        (out_dir / "veridraft.json").write_text(json.dumps({"name": kwargs["name"]}))

    monkeypatch.setattr(convert, "write_metadata", fake_metadata)
    prec = "q4a8" if q4kernel.a8_supported() else "q4"
    m1 = load(gguf, precision=prec)
    m2 = load(str(gguf), precision=prec)
    sha16 = convert.sha256_file(gguf)[:16]
    assert calls == [gguf.resolve()]
    assert m1.path == m2.path == tmp_path / "vd" / "models" / f"gguf-{sha16}"
    assert m1.name == "my-model" and m1.gguf_path == gguf.resolve()
    assert not any(m1.path.rglob("*.safetensors")) and not (m1.path / "float32").exists()
    assert catalog.folder_size(m1.path) < 10_000_000  # config and tokenizer only
    assert [p.name for p in (tmp_path / "vd" / "models").iterdir()] == [m1.path.name]
    assert any(r["name"] == m1.path.name for r in list_models())
    moved = tmp_path / "moved.gguf"
    gguf.rename(moved)
    m3 = load(moved, precision=prec)
    assert m3.path == m1.path and m3.gguf_path == moved.resolve() and len(calls) == 1
    ids = m1.tokenizer.encode("def fib(n):")
    import torch

    with torch.inference_mode():
        a = m1.net(torch.tensor(ids), m1.net.new_cache(32))
        b = m3.net(torch.tensor(ids), m3.net.new_cache(32))
    assert torch.equal(a, b)


def test_load_catalog_model(real_model):
    m = real_model("smollm2-135m")
    assert isinstance(m, LoadedModel)
    assert m.name == "smollm2-135m" and m.precision == "fp32"
    assert m.context_length == 8192 == m.net.config.max_position_embeddings
    assert m.path == catalog.model_dir("smollm2-135m")
    assert m.gguf_path == m.path / "source.gguf"
    assert m.tokenizer.has_chat_template and 2 in m.tokenizer.eos_ids
    assert m.net.config.vocab_size >= m.tokenizer.vocab_size
    assert "smollm2-135m" in repr(m) and "fp32" in repr(m)
    g = real_model("gemma3-270m")
    assert g.context_length == 32768 and not g.tokenizer.has_chat_template
    assert g.tokenizer.encode("x")[0] == g.tokenizer.bos_id == g.net.config.bos_token_id


def test_load_by_name_or_folder_is_the_same_and_writes_nothing(real_model_dir):
    """A pulled model loads the same by name and by folder, and once its float32 copy is there
    (the first fp32 load makes it), loading writes nothing."""
    import torch

    by_name = load("smollm2-135m")
    folder = real_model_dir("smollm2-135m")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.rglob("*"))
    by_folder = load(folder)
    assert by_name.name == by_folder.name == "smollm2-135m"
    assert by_name.path == by_folder.path == folder
    ids = torch.tensor(by_name.tokenizer.encode("Hello"))
    with torch.inference_mode():
        a = by_name.net(ids, by_name.net.new_cache(16))
        b = by_folder.net(ids, by_folder.net.new_cache(16))
    assert torch.equal(a, b)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.rglob("*")) == before


def test_list_models_rows():
    rows = list_models()
    names = [r["name"] for r in rows]
    assert names[:2] == ["smollm2-135m", "gemma3-270m"]
    for r in rows:
        assert {"name", "description", "size", "pulled", "path"} <= set(r)
