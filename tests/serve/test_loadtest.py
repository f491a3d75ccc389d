"""The load test's llama-server peer: its command line, its drafter specs, a peer that cannot
start (its rows fail with the reason, the run goes on), the report's memory column, and whole
runs against stand-in servers (no llama-server binary needed), in ABBA order."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import pytest

from veridraft.errors import VeridraftError
from veridraft.serve import loadtest
from veridraft.serve.loadtest import (
    Level,
    llama_draft,
    llama_server_command,
    peak_rss_mb,
    table,
)


def _value(cmd: list[str], flag: str) -> str:
    assert cmd.count(flag) == 1, f"{flag} should appear once in {cmd}"
    return cmd[cmd.index(flag) + 1]


def test_llama_server_command_has_slots_continuous_batching_and_a_context_per_slot():
    cmd = llama_server_command(
        "/opt/llama-server", "/m/source.gguf", port=8123, slots=4, ctx_per_slot=2048, threads=2
    )
    assert cmd[0] == "/opt/llama-server"
    assert _value(cmd, "--model") == "/m/source.gguf"
    assert _value(cmd, "--host") == "127.0.0.1"  # loopback only
    assert _value(cmd, "--port") == "8123"
    assert _value(cmd, "--parallel") == "4"
    assert "--cont-batching" in cmd
    assert _value(cmd, "--ctx-size") == str(4 * 2048)  # each of the 4 slots gets 2048
    assert _value(cmd, "--threads") == "2"
    assert _value(cmd, "--threads-batch") == "2"
    assert _value(cmd, "--cache-ram") == "0"
    assert not any("draft" in a for a in cmd)


def test_llama_server_command_with_a_draft_model():
    cmd = llama_server_command(
        "llama-server",
        "/m/target.gguf",
        port=1,
        slots=2,
        ctx_per_slot=1024,
        threads=2,
        draft_gguf="/m/draft.gguf",
        draft_max=4,
    )
    assert _value(cmd, "--model-draft") == "/m/draft.gguf"
    assert _value(cmd, "--spec-type") == "draft-simple"
    assert _value(cmd, "--spec-draft-n-max") == "4"
    assert _value(cmd, "--spec-draft-n-min") == "0"
    assert _value(cmd, "--threads-draft") == "2"
    assert _value(cmd, "--ctx-size") == "2048"
    # No k: llama.cpp's own draft length; no threads: llama.cpp's own count.
    cmd = llama_server_command("s", "t.gguf", port=1, slots=1, ctx_per_slot=64, draft_gguf="d")
    assert "--spec-draft-n-max" not in cmd and "--threads" not in cmd
    assert _value(cmd, "--model-draft") == "d"


def test_llama_draft_takes_none_and_a_draft_model_and_refuses_the_rest():
    assert llama_draft("none") == (None, None)
    assert llama_draft("model:qwen2.5-coder-0.5b") == ("qwen2.5-coder-0.5b", None)
    assert llama_draft("model:qwen2.5-coder-0.5b:k=4") == ("qwen2.5-coder-0.5b", 4)
    for bad in ("suffix", "ngram:num_tokens=4", "model:qwen2.5-coder-0.5b:k=4,mode=fixed"):
        with pytest.raises(VeridraftError, match="llama-server drafts with a draft model only"):
            llama_draft(bad)
    with pytest.raises(VeridraftError, match="k must be an integer >= 1"):
        llama_draft("model:x:k=0")


def test_requests_carry_each_servers_own_fields():
    assert loadtest.request_extra("veridraft", "none") == {"veridraft": {"draft": None}}
    assert loadtest.request_extra("veridraft", "suffix") == {"veridraft": {"draft": "suffix"}}
    assert loadtest.request_extra("llama-server", "none") == {"cache_prompt": False}


def _run(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = loadtest.main(["--clients", "1,2", "--drafts", "none", "--requests", "1", *argv])
    out = capsys.readouterr()
    rows = [ln for ln in out.out.splitlines() if ln.startswith("| llama-server")]
    return code, rows, out.err


def test_a_missing_binary_fails_its_rows_with_the_reason_not_the_run(tmp_path, capsys):
    missing = tmp_path / "bin" / "llama-server"
    code, rows, err = _run(capsys, "--peer", "llama-server", "--llama-server", str(missing))
    assert code == 1
    assert len(rows) == 2  # one per client count: the run went through every level
    for row, clients in zip(rows, (1, 2)):
        assert row.startswith(f"| llama-server | none | {clients} | failed: llama-server not found")
        assert str(missing) in row and "make setup-llama-server" in row
        assert row.count("|") == 16  # the header's 15 columns
    assert "llama-server not found" in err


def _fake_server(tmp_path):
    """A llama-server that says why it cannot load and exits, and a model file for it."""
    fake = tmp_path / "llama-server"
    fake.write_text(
        "#!/bin/sh\necho 'loading model'\necho 'error: unknown model arch' >&2\nexit 3\n"
    )
    fake.chmod(0o755)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    return ["--peer", "llama-server", "--llama-server", str(fake), "--model", str(gguf)]


def test_a_server_that_exits_fails_its_rows_with_its_last_line(tmp_path, capsys):
    code, rows, _ = _run(capsys, *_fake_server(tmp_path))
    assert code == 1 and len(rows) == 2
    for row in rows:
        assert "failed: llama-server exited with status 3: error: unknown model arch" in row


def test_a_drafter_llama_server_has_no_equivalent_of_fails_its_own_rows(tmp_path, capsys):
    code, rows, _ = _run(capsys, *_fake_server(tmp_path), "--drafts", "none,suffix")
    assert code == 1
    assert [r.split(" | ")[1:3] for r in rows] == [["none", "1"], ["suffix", "1"], ["none", "2"],
                                                   ["suffix", "2"]]  # fmt: skip
    assert "exited with status 3" in rows[0]
    assert "llama-server drafts with a draft model only" in rows[1]


def test_a_missing_model_names_the_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path))
    with pytest.raises(VeridraftError, match="veridraft models pull nosuch-model"):
        loadtest.model_gguf("nosuch-model")
    with pytest.raises(VeridraftError, match="is not a file"):
        loadtest.model_gguf(str(tmp_path / "absent.gguf"))
    folder = tmp_path / "models" / "m"
    folder.mkdir(parents=True)
    with pytest.raises(VeridraftError, match="no original GGUF"):
        loadtest.model_gguf("m")
    (folder / "source.gguf").write_bytes(b"GGUF")
    assert loadtest.model_gguf("m") == folder / "source.gguf"


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--peer", "vllm"], "--peer 'vllm' is none of veridraft, llama-server"),
        (["--peer", "veridraft,llama-server", "--base-url", "http://x/v1"], "one --peer"),
        (["--clients", "0"], "between 1 and 64"),
        (["--clients", "two"], "integers separated by commas"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, msg):
    p = argparse.ArgumentParser()
    loadtest.add_arguments(p)
    with pytest.raises(VeridraftError, match=msg.replace("(", r"\(")):
        loadtest._check(p.parse_args(argv))


def test_peak_rss_reads_the_process_high_water_mark():
    mb = peak_rss_mb(os.getpid())
    with open(f"/proc/{os.getpid()}/status") as f:
        hwm_kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    assert mb == pytest.approx(hwm_kb / 1024, rel=0.05) and mb > 1
    assert math.isnan(peak_rss_mb(None))
    assert math.isnan(peak_rss_mb(2**22 + 12345))  # no such process


def test_the_table_shows_the_server_and_its_peak_memory():
    level = Level("none", 2, wall_s=2.0, server="llama-server", peak_rss_mb=123.4)
    level.results = [
        loadtest.Result(0.1, 1.0, 10, None, [0.05, 0.07], prompt_tokens=40),
        loadtest.Result(0.2, 1.1, 10, None, [0.06], prompt_tokens=60),
    ]
    row = level.row()
    assert row["server"] == "llama-server" and row["tokens_per_s"] == 10.0
    assert row["prompt_tokens_mean"] == 50
    line = table([row]).splitlines()[-1]
    assert line.startswith("| llama-server | none | 2 | 2 | 10.0 | 0.10 | 0.20 | 60 | 70 |")
    assert line.endswith("| – | 50 | 123 | – | – |")  # no τ, no engine clock from llama-server


def test_the_engine_clock_gives_the_prefill_share_and_the_rate_of_decode_rounds():
    level = Level("none", 2, wall_s=2.0, busy={"prefill": 0.5, "decode": 1.5})
    level.results = [loadtest.Result(0.1, 1.0, 10, None, [0.05]) for _ in range(4)]
    row = level.row()
    assert row["prefill_share"] == pytest.approx(0.25)
    # 40 tokens, 4 of them first tokens (from the prompts' last rows): 36 in 1.5 s of rounds
    assert row["decode_tokens_per_s"] == pytest.approx(24.0)
    assert table([row]).splitlines()[-1].endswith("| 25% | 24.0 |")
    other = Level("none", 2, wall_s=1.0, busy={"prefill": 0.5, "decode": 0.5})
    other.results = level.results[:1]
    merged = loadtest.merge([level, other]).row()  # the halves' seconds add up
    assert merged["prefill_share"] == pytest.approx(1.0 / 3.0)
    assert math.isnan(loadtest.merge([level, Level("none", 2, wall_s=1.0)]).row()["prefill_share"])


def test_engine_busy_reads_veridrafts_metrics_and_nothing_from_other_servers(monkeypatch):
    text = (
        "# HELP veridraft:engine_busy_seconds_total x\n"
        'veridraft:engine_busy_seconds_total{model_name="m",phase="prefill"} 1.25\n'
        'veridraft:engine_busy_seconds_total{model_name="m",phase="decode"} 3.5\n'
        'veridraft:prefill_seconds_total{model_name="m"} 9.0\n'
    )
    seen = []

    class Answer:
        def __init__(self, body):
            self.body = body

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return self.body.encode()

    def fake_open(url, timeout):
        seen.append(url)
        return Answer(text if "good" in url else "llamacpp:prompt_seconds_total 4\n")

    monkeypatch.setattr(loadtest.urllib.request, "urlopen", fake_open)
    assert loadtest.engine_busy("http://good:1/v1") == {"prefill": 1.25, "decode": 3.5}
    assert seen[-1] == "http://good:1/metrics"
    assert loadtest.engine_busy("http://other:1/v1") is None


# A stand-in for llama-server, stdlib only: /health, /v1/models and a streamed
# /v1/chat/completions of max_tokens one-word chunks, then a usage chunk. It notes its command
# line and every request (without the messages) in record.jsonl beside its --model file.
FAKE_SERVER = """\
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

argv = sys.argv[1:]
opt = lambda flag: argv[argv.index(flag) + 1]
port = int(opt("--port"))
record = Path(opt("--model")).with_name("record.jsonl")


def note(**kw):
    with open(record, "a") as f:
        f.write(json.dumps({"port": port, **kw}) + "\\n")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _json(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self._json({"status": "ok"})
        elif self.path == "/v1/models":
            model = {"id": "fake", "object": "model", "created": 0, "owned_by": "test"}
            self._json({"object": "list", "data": [model]})
        else:
            self.send_error(404)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        note(request={k: v for k, v in req.items() if k != "messages"})
        n, prompt = req["max_tokens"], len(req["messages"][0]["content"].split())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "fake"}

        def send(obj):
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\\n\\n")
            self.wfile.flush()

        for i in range(n):
            time.sleep(0.002)
            delta = {"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}
            chunk = {**base, "choices": [delta]}
            if "veridraft" in req:
                chunk["veridraft"] = {"tau": 2.0}
            send(chunk)
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        send({**base, "choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\\n\\n")


note(argv=argv)
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def _stand_ins(tmp_path, monkeypatch):
    """The stand-in as llama-server, and under veridraft's name (one server for every drafter);
    the model file it is given."""
    fake = tmp_path / "llama-server"
    fake.write_text(f"#!{sys.executable}\n{FAKE_SERVER}")
    fake.chmod(0o755)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    def fake_veridraft(args):
        s = loadtest.start_llama_server(args, "none")
        s.name, s.draft = "veridraft", None
        return s

    monkeypatch.setattr(loadtest, "start_veridraft", fake_veridraft)
    return fake, gguf


def _sequential(units: list, n: int) -> list:
    """The order the load test used before it interleaved: each unit's n requests back to back."""
    return [u for u in units for _ in range(n)]


def test_both_servers_run_every_client_count_in_alternating_order(tmp_path, capsys, monkeypatch):
    """The whole run against two stand-in servers: llama-server's command line and request
    fields, veridraft's, the order flipping per client count and ABBA within one, and every
    row's figures over both halves."""
    fake, gguf = _stand_ins(tmp_path, monkeypatch)
    code = loadtest.main(
        ["--peer", "veridraft,llama-server", "--llama-server", str(fake), "--model", str(gguf),
         "--clients", "1,2", "--drafts", "none", "--requests", "3", "--max-tokens", "6",
         "--max-num-seqs", "2", "--ctx-per-slot", "512", "--threads", "2"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [ln.split(" | ") for ln in out.splitlines() if ln.startswith("| ") and "---" not in ln]
    rows = rows[1:]  # the header
    # server, clients: the order flips from one client count to the next
    assert [(r[0].strip("| "), r[2]) for r in rows] == [
        ("veridraft", "1"), ("llama-server", "1"), ("llama-server", "2"), ("veridraft", "2")
    ]  # fmt: skip
    for r in rows:
        assert r[3] == "3"  # requests, none failed
        assert float(r[4]) > 0  # tokens/s
        assert float(r[9]) > 0  # tokens/s per stream
        assert r[10] == ("2.00" if r[0] == "| veridraft" else "–")  # τ: veridraft's own
        assert int(r[11]) > 5  # the prompt tokens the server counted
        assert int(r[12].rstrip(" |")) > 1  # the server process's peak RSS, MB

    notes = [json.loads(ln) for ln in (tmp_path / "record.jsonl").read_text().splitlines()]
    argvs = {n["port"]: n["argv"] for n in notes if "argv" in n}
    assert len(argvs) == 2
    for argv in argvs.values():
        assert _value(argv, "--parallel") == "2" and _value(argv, "--ctx-size") == "1024"
        assert _value(argv, "--model") == str(gguf)
    requests = [n for n in notes if "request" in n]
    assert len(requests) == 2 * (1 + 2 * 3)  # per server: a warm-up, 3 per client count
    for n in requests:
        req = n["request"]
        assert req["stream"] is True and req["temperature"] == 0
        assert req["max_tokens"] in (6, 8)  # the run's, or the warm-up's
    by_port = {p: [n["request"] for n in requests if n["port"] == p] for p in argvs}
    kinds = sorted(
        ("veridraft" in rs[0], all(r.get("cache_prompt") is False for r in rs))
        for rs in by_port.values()
    )
    # One server got veridraft's drafter field, the other llama-server's cache_prompt: false.
    assert kinds == [(False, True), (True, False)]

    # The measured requests (max_tokens 6, not the warm-ups' 8) in the order the servers got
    # them: per client count, 2 then 1 of the 3 requests, the second half in reverse (ABBA).
    vd = next(p for p, rs in by_port.items() if "veridraft" in rs[0])
    seen = ["V" if n["port"] == vd else "L" for n in requests if n["request"]["max_tokens"] == 6]
    abba = ["V", "V", "L", "L", "L", "V"] + ["L", "L", "V", "V", "V", "L"]
    assert seen == abba
    # The control: the old order, each server's 3 requests back to back, is not what ran.
    assert seen != _sequential(["V", "L"], 3) + _sequential(["L", "V"], 3)
    assert "Order: interleaved (ABBA)" in out


def test_drafters_run_in_abba_order_and_each_row_sums_both_halves(tmp_path, capsys, monkeypatch):
    fake, gguf = _stand_ins(tmp_path, monkeypatch)
    code = loadtest.main(
        ["--peer", "veridraft", "--llama-server", str(fake), "--model", str(gguf),
         "--clients", "1", "--drafts", "none,ngram,suffix", "--requests", "4",
         "--max-tokens", "5", "--max-num-seqs", "1", "--ctx-per-slot", "256"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    notes = [json.loads(ln) for ln in (tmp_path / "record.jsonl").read_text().splitlines()]
    seen = [
        n["request"]["veridraft"]["draft"] or "none"
        for n in notes
        if "request" in n and n["request"]["max_tokens"] == 5
    ]
    units = ["none", "ngram", "suffix"]
    assert seen == [d for d in units + units[::-1] for _ in range(2)]
    # one warm-up per drafter before any timed request (a draft model loads at its first use)
    warm = [
        n["request"]["veridraft"]["draft"] or "none"
        for n in notes
        if "request" in n and n["request"]["max_tokens"] == 8
    ]
    assert warm == units
    assert seen != _sequential(units, 4)  # the control: the old order would fail the check
    rows = [ln.split(" | ") for ln in out.splitlines() if ln.startswith("| veridraft")]
    assert [r[1] for r in rows] == units  # the table keeps the first half's order
    for r in rows:
        assert r[3] == "4"  # both halves' requests in one row


def test_abba_splits_the_requests_and_reverses_the_second_half():
    assert loadtest.abba(["A", "B"], 5) == [("A", 0, 3), ("B", 0, 3), ("B", 3, 2), ("A", 3, 2)]
    assert loadtest.abba(["A", "B", "C"], 1) == [("A", 0, 1), ("B", 0, 1), ("C", 0, 1)]


def test_a_row_over_two_halves_is_total_tokens_over_total_time():
    def half(wall, tokens, ttft, gap, rss):
        lv = Level("ngram", 2, wall_s=wall, server="veridraft", peak_rss_mb=rss)
        lv.results = [loadtest.Result(ttft, 1.0, tokens, 2.0, [gap])]
        return lv

    a, b = half(1.0, 20, 0.1, 0.01, 100.0), half(3.0, 20, 0.3, 0.03, 120.0)
    b.errors = 1
    row = loadtest.merge([a, b]).row()
    # 40 tokens in 4 s: 10/s; the mean of the halves' rates (20/s and 6.7/s) would be 13.3.
    assert row["tokens_per_s"] == pytest.approx(10.0)
    assert row["requests"] == 2 and row["errors"] == 1
    assert row["ttft_p50_s"] == pytest.approx(0.1) and row["ttft_p99_s"] == pytest.approx(0.3)
    assert row["itl_p99_s"] == pytest.approx(0.03)
    assert row["peak_rss_mb"] == 120.0
    assert (row["server"], row["draft"], row["clients"]) == ("veridraft", "ngram", 2)


def test_groups_pick_the_prompts_and_an_unknown_group_is_a_one_line_error():
    from veridraft.bench.questions import default_questions_path, load_questions

    by_text = {q.turns[0]: q.group for q in load_questions(default_questions_path())}
    short = loadtest._prompts(8, ["mt_bench", "qa"])
    assert len(short) > 8
    assert {by_text[p[0]["content"]] for p in short} == {"mt_bench", "qa"}
    # without groups, every group is in (the figures in the docs were taken so)
    assert len({by_text[p[0]["content"]] for p in loadtest._prompts(8)}) == 6
    p = argparse.ArgumentParser()
    loadtest.add_arguments(p)
    args = p.parse_args(["--groups", "mt_bench, qa"])
    loadtest._check(args)
    assert args.groups == ["mt_bench", "qa"]
    with pytest.raises(VeridraftError, match="unknown task group.*poetry"):
        loadtest._check(p.parse_args(["--groups", "poetry"]))
