"""llama-server for the load test: the build's skip, install and errors (fast), and a real
llama-server answering two streamed requests at once (slow; skipped when it is not built)."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import urllib.request

import pytest

from veridraft.errors import VeridraftError
from veridraft.serve import llama_server, loadtest


def test_a_build_with_the_same_version_and_flags_is_skipped(tmp_path, monkeypatch):
    binary = tmp_path / "bin" / "llama-server"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    flags = ["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON"]
    info = llama_server.stamp("0.3.36", [*llama_server.FIXED_CMAKE_ARGS, *flags])
    (tmp_path / "bin" / "llama-server.json").write_text(json.dumps(info))

    def building():
        raise RuntimeError("building")

    monkeypatch.setattr(llama_server, "find_tools", building)
    assert llama_server.build("0.3.36", flags, binary=binary) == binary
    # Other flags, another version, or a stamp without its binary: built again.
    for version, other, gone in (("0.3.36", ["-DGGML_AVX2=OFF"], False), ("0.3.37", flags, False),
                                 ("0.3.36", flags, True)):  # fmt: skip
        if gone:
            binary.unlink()
        with pytest.raises(RuntimeError, match="building"):
            llama_server.build(version, other, binary=binary)


def test_install_replaces_the_binary_whole_or_not_at_all(tmp_path, monkeypatch):
    binary = tmp_path / "bin" / "llama-server"
    built = tmp_path / "built"
    built.write_text("new")
    llama_server.install(built, binary, {"package": "x"})
    assert binary.read_text() == "new" and os.access(binary, os.X_OK)
    assert json.loads((tmp_path / "bin" / "llama-server.json").read_text()) == {"package": "x"}

    def copy_half(src, dst):
        with open(dst, "w") as f:
            f.write("ne")
        raise OSError("No space left on device")

    monkeypatch.setattr(llama_server.shutil, "copyfile", copy_half)
    built.write_text("newer")
    with pytest.raises(OSError, match="No space"):
        llama_server.install(built, binary, {"package": "y"})
    assert binary.read_text() == "new"  # the old binary, whole
    assert sorted(p.name for p in binary.parent.iterdir()) == ["llama-server", "llama-server.json"]
    assert json.loads((tmp_path / "bin" / "llama-server.json").read_text()) == {"package": "x"}


def test_missing_tools_are_named_with_the_package_to_install(monkeypatch):
    have: set[str] = set()
    monkeypatch.setattr(llama_server.shutil, "which", lambda c, path=None: c if c in have else None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(VeridraftError, match="cmake not found: apt-get install cmake"):
        llama_server.find_tools()
    have.add("cmake")
    with pytest.raises(VeridraftError, match="no C\\+\\+ compiler found: apt-get install g\\+\\+"):
        llama_server.find_tools()
    have.add("g++")
    with pytest.raises(VeridraftError, match="apt-get install make"):
        llama_server.find_tools()
    have.add("ninja")
    assert llama_server.find_tools() == ("cmake", ["-G", "Ninja"])
    have.add("make")
    assert llama_server.find_tools() == ("cmake", ["-G", "Unix Makefiles"])


def test_the_binary_lives_under_the_veridraft_home(tmp_path, monkeypatch):
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path))
    assert llama_server.binary_path() == tmp_path / "bin" / "llama-server"


@pytest.mark.real
@pytest.mark.slow
def test_llama_server_streams_two_answers_at_once_from_two_slots():
    import openai

    binary = llama_server.binary_path()
    if not os.access(binary, os.X_OK):
        pytest.skip(f"no llama-server at {binary} (make setup-llama-server builds it)")
    try:
        loadtest.model_gguf("smollm2-135m")
    except VeridraftError as e:
        pytest.skip(str(e))
    args = argparse.Namespace(
        model="smollm2-135m", llama_server=None, max_num_seqs=2, ctx_per_slot=1024, threads=2
    )
    server = loadtest.start_llama_server(args, "none")
    assert server.error is None, server.error
    try:
        with urllib.request.urlopen(server.base.removesuffix("/v1") + "/props") as r:
            props = json.load(r)
        assert props["total_slots"] == 2
        client = openai.OpenAI(base_url=server.base, api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        questions = ["Name three colours of the rainbow.", "Why is the sea salty?"]
        spans: list[tuple[float, float, loadtest.Result]] = []

        def ask(q: str) -> None:
            t0 = time.perf_counter()
            r = loadtest._one(client, model, [{"role": "user", "content": q}], 48,
                              loadtest.request_extra("llama-server", "none"))  # fmt: skip
            spans.append((t0 + r.ttft, t0 + r.e2e, r))

        threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(spans) == 2
        for _, _, r in spans:
            assert r.tokens > 1 and r.prompt_tokens > 5 and r.gaps  # streamed, token by token
        (a0, a1, _), (b0, b1, _) = spans
        assert a0 < b1 and b0 < a1, "the two answers streamed one after the other, not together"
        assert loadtest.peak_rss_mb(server.proc.pid) > 50  # the model is in memory
    finally:
        server.stop()
    assert server.proc.poll() is not None
