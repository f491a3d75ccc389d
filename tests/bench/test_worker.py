"""Peers in worker processes: a worker killed by a signal is that method's failed run, with the
reason, and the benchmark goes on (no llama.cpp needed: a fake peer kills itself)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from fake_peer import CRASH

from veridraft.bench.base import Method, RunOutput
from veridraft.bench.peers import make_peer
from veridraft.bench.protocol import Protocol, run_protocol
from veridraft.bench.questions import Question
from veridraft.bench.worker import WorkerDied, WorkerMethod, death_reason

HERE = str(Path(__file__).resolve().parent)
SIGILL = "fake worker died: signal SIGILL (Illegal instruction)"


@pytest.fixture
def fake_path(monkeypatch):
    # the worker process imports the fake peer from this directory
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))


def model():
    return SimpleNamespace(
        name="toy", path=None, context_length=256, tokenizer=SimpleNamespace(eos_ids={2})
    )


def test_death_reason_names_the_signal_or_the_exit_code():
    assert death_reason(-signal.SIGILL) == "signal SIGILL (Illegal instruction)"
    assert death_reason(-signal.SIGSEGV) == "signal SIGSEGV (Segmentation fault)"
    assert death_reason(3) == "exit code 3"


def test_worker_runs_reports_a_crash_and_restarts(fake_path):
    m = WorkerMethod("fake:ar", model(), "fake_peer:make")
    try:
        m.prepare()
        assert m.skip_reason is None
        pid = m.proc.pid
        out = m.run([1, 2, 3], max_new_tokens=4, temperature=0.0, seed=7)
        assert out.ids == [7, 8, 9, 10] and out.wall_s == 0.01
        assert 5 < out.peak_rss_mb < 200  # the worker's own peak, without torch in it
        assert m.proc.pid == pid  # one worker for every run while it lives
        with pytest.raises(WorkerDied, match=r"^fake worker died: signal SIGILL \(Illegal"):
            m.run([CRASH, 1], max_new_tokens=4, temperature=0.0, seed=0)
        assert m.proc is None
        out = m.run([1], max_new_tokens=2, temperature=0.0, seed=1)  # a fresh worker
        assert out.ids == [1, 2] and m.proc.pid != pid
    finally:
        m.close()
    assert m.proc is None


class Plain(Method):
    def run(self, prompt_ids, *, max_new_tokens, temperature, seed) -> RunOutput:
        return RunOutput(ids=[5] * max_new_tokens, wall_s=0.02, finish_reason="length")


def test_a_crashing_peer_is_a_failed_row_and_the_run_goes_on(fake_path):
    questions = [
        Question("crash", "qa", ["boom"]),
        Question("fine", "qa", ["hello", "and again"]),
    ]
    peer = WorkerMethod("fake:ar", model(), "fake_peer:make")
    logs: list[str] = []
    try:
        records = run_protocol(
            questions,
            [Plain("ar"), peer],
            encode=lambda msgs: [CRASH if msgs[-1]["content"] == "boom" else 1, 2, 3],
            decode_text=lambda ids: "x",
            protocol=Protocol(max_new_tokens=3, progress=False, log=logs.append),
        )
    finally:
        peer.close()
    rows = {(r["method"], r["question_id"], r["turn"]): r for r in records}
    assert set(rows) == {
        ("ar", "crash", 0),
        ("ar", "fine", 0),
        ("ar", "fine", 1),
        ("fake:ar", "crash", 0),
        ("fake:ar", "fine", 0),
        ("fake:ar", "fine", 1),
    }
    assert rows[("fake:ar", "crash", 0)]["error"] == f"WorkerDied: {SIGILL}"
    assert any(SIGILL in line for line in logs)  # the warm-up on question 1 crashed too
    for key in [k for k in rows if k != ("fake:ar", "crash", 0)]:
        assert not rows[key].get("error") and rows[key]["new_tokens"] == 3


def test_the_worker_process_does_not_import_torch():
    code = (
        "import sys, veridraft.bench.worker, veridraft.bench.peers; print('torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "False", out.stderr


def test_llamacpp_peers_run_in_a_worker():
    m = make_peer("llamacpp:pld", model())
    assert isinstance(m, WorkerMethod) and m.engine == "llamacpp" and m.proc is None
    assert m.factory == "veridraft.bench.peers:local_peer"
    assert make_peer("hf:ar", model()).engine == "hf"  # transformers stays in-process
