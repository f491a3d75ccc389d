"""A bounded load run against veridraft's server and llama.cpp's on loopback, with the openai client.

    veridraft loadtest --model smollm2-135m --precision q4a8 --threads 2 \\
        --peer veridraft,llama-server --clients 1,2,4 --drafts none --max-tokens 64

(also `python -m veridraft.serve.loadtest`) starts each server under test on a free loopback
port (or uses --base-url), then for each client count, server and drafter sends a fixed number of
streaming chat requests (Spec-Bench dev questions, first turns, greedy; --groups picks the task
groups) from that many client threads, and prints the aggregate tokens/s of all clients, time to first token and inter-token
latency (the gap between streamed chunks, as the client sees it: with speculation one chunk may
carry several tokens), p50 and p99, and the server process's peak resident memory. For
veridraft it also reads the engine's own clock from /metrics (`veridraft:engine_busy_seconds`):
the share of the engine's time that went to prompts, and the tokens per second of its decoding
rounds alone, which is what batching multiplies (the aggregate also carries every prompt).

Servers: `veridraft` (`veridraft serve`; the drafter is chosen per request, so one server serves
every drafter) and `llama-server` (llama.cpp's own server, built by `make setup-llama-server`, on
the model's original GGUF with --parallel slots and continuous batching; drafters `none` and
`model:NAME[:k=K]`, a server each, NAME's GGUF as its draft model). Both get the same prompts,
the same max tokens, the same number of slots and the same KV positions per slot. With several
servers each client count runs all of them, in alternating order. Within a client count the
requests run in two halves, the second in reverse order of server and drafter (A B ... B A), and
each row sums both halves, so a machine whose load drifts favours no drafter or server. A server
that does not start fails its rows with the reason; the others run. Everything is bounded:
requests per level, and --time-limit for the whole run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..defaults import DEFAULT_MODEL
from ..errors import VeridraftError

PEERS = ("veridraft", "llama-server")
START_TIMEOUT_S = 300.0


@dataclass
class Result:
    ttft: float
    e2e: float
    tokens: int
    tau: float | None
    gaps: list[float] = field(default_factory=list)  # seconds between streamed chunks
    prompt_tokens: int = 0


@dataclass
class Level:
    draft: str
    concurrency: int
    wall_s: float = 0.0
    results: list[Result] = field(default_factory=list)
    errors: int = 0
    server: str = "veridraft"
    peak_rss_mb: float = float("nan")  # the server process's VmHWM after this level
    failed: str | None = None  # why the server of this row did not run it
    busy: dict[str, float] | None = None  # the engine's prefill / decode seconds in this level

    def row(self) -> dict:
        r = self.results
        toks = sum(x.tokens for x in r)
        ttft = sorted(x.ttft for x in r)
        decode = [(x.tokens - 1) / (x.e2e - x.ttft) for x in r if x.tokens > 1 and x.e2e > x.ttft]
        taus = [x.tau for x in r if x.tau is not None]
        b = self.busy or {}
        pre, dec = b.get("prefill", float("nan")), b.get("decode", float("nan"))
        return {
            "server": self.server,
            "draft": self.draft,
            "clients": self.concurrency,
            "requests": len(r),
            "errors": self.errors,
            "failed": self.failed,
            "req_per_min": 60 * len(r) / self.wall_s if self.wall_s else 0.0,
            "ttft_median_s": statistics.median(ttft) if ttft else float("nan"),
            "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))] if ttft else float("nan"),
            "ttft_p50_s": pct(ttft, 0.5),
            "ttft_p99_s": pct(ttft, 0.99),
            "itl_p50_s": pct([g for x in r for g in x.gaps], 0.5),
            "itl_p99_s": pct([g for x in r for g in x.gaps], 0.99),
            "tokens_per_s": toks / self.wall_s if self.wall_s else 0.0,
            "stream_tokens_per_s": statistics.median(decode) if decode else float("nan"),
            "tau": statistics.mean(taus) if taus else float("nan"),
            "prompt_tokens_mean": statistics.mean(x.prompt_tokens for x in r) if r else 0.0,
            "peak_rss_mb": self.peak_rss_mb,
            "prefill_share": pre / (pre + dec) if pre + dec > 0 else float("nan"),
            # a request's first token comes from its prompt's last row, the rest from rounds
            "decode_tokens_per_s": (toks - len(r)) / dec if dec > 0 else float("nan"),
        }


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of xs (nearest rank), NaN for none."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def _prompts(n: int, groups: list[str] | None = None) -> list[list[dict]]:
    """More than n first turns of the Spec-Bench dev questions, picked evenly across the task
    groups (all, or `groups`)."""
    from ..bench.questions import default_questions_path, groups_in, load_questions, select

    qs = load_questions(default_questions_path())
    k = len(groups) if groups else len(groups_in(qs))
    qs = select(qs, groups=groups, limit=n // k + 1)
    return [[{"role": "user", "content": q.turns[0]}] for q in qs]


def _one(client, model: str, messages, max_tokens: int, extra: dict) -> Result:
    """One streamed chat request; `extra` is the server's own request fields."""
    t0 = time.perf_counter()
    ttft = None
    tokens, prompt_tokens, tau, times = 0, 0, None, []
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            if ttft is None:
                ttft = times[-1] - t0
        stats = (chunk.model_extra or {}).get("veridraft")
        if stats:
            tau = stats["tau"]
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
            prompt_tokens = chunk.usage.prompt_tokens
    e2e = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(times, times[1:])]
    return Result(ttft if ttft is not None else e2e, e2e, tokens, tau, gaps, prompt_tokens)


def request_extra(server: str, draft: str) -> dict:
    """The request fields a server gets beside OpenAI's. veridraft: this request's drafter.
    llama-server: no reuse of a previous request's prompt cache, since veridraft has none and the
    same prompts come back at every level; the drafter is the server's own."""
    if server == "llama-server":
        return {"cache_prompt": False}
    return {"veridraft": {"draft": None if draft == "none" else draft}}


def run_level(
    client, model, prompts, draft, concurrency, n_requests, max_tokens, deadline, extra=None
):
    level = Level(draft, concurrency)
    extra = request_extra("veridraft", draft) if extra is None else extra
    lock = threading.Lock()
    todo = list(range(n_requests))

    def worker():
        while True:
            with lock:
                if not todo or time.monotonic() > deadline:
                    return
                i = todo.pop(0)
            try:
                r = _one(client, model, prompts[i % len(prompts)], max_tokens, extra)
            except Exception as e:  # counted and shown; the run goes on
                print(f"request failed: {type(e).__name__}: {e}", file=sys.stderr)
                with lock:
                    level.errors += 1
                continue
            with lock:
                level.results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    level.wall_s = time.perf_counter() - t0
    return level


def abba(units: list, n: int) -> list[tuple[object, int, int]]:
    """The run order of one client count: (unit, first request, request count) for each half.
    The first half of the n requests goes to every unit in order, the second half in reverse
    (A B ... B A), so a machine whose load drifts during the level weighs on every unit alike
    instead of favouring whichever ran first. An empty half (n = 1) is left out."""
    first, second = n - n // 2, n // 2
    out = [(u, 0, first) for u in units]
    if second:
        out += [(u, first, second) for u in reversed(units)]
    return out


def merge(levels: list[Level]) -> Level:
    """One row out of a unit's halves: their requests together over their summed wall time
    (tokens/s = all tokens / all wall time; percentiles over every request)."""
    out = Level(levels[0].draft, levels[0].concurrency, server=levels[0].server)
    for lv in levels:
        out.wall_s += lv.wall_s
        out.results += lv.results
        out.errors += lv.errors
    rss = [lv.peak_rss_mb for lv in levels if lv.peak_rss_mb == lv.peak_rss_mb]
    out.peak_rss_mb = max(rss) if rss else float("nan")
    if all(lv.busy is not None for lv in levels):
        out.busy = {p: sum(lv.busy.get(p, 0.0) for lv in levels) for p in ("prefill", "decode")}
    return out


_BUSY = re.compile(r'^veridraft:engine_busy_seconds_total\{[^}]*phase="(\w+)"[^}]*\} (\S+)$', re.M)


def engine_busy(base: str) -> dict[str, float] | None:
    """veridraft's engine seconds so far by phase, from the server's /metrics (None: a server
    without them, e.g. llama-server, or one that does not answer)."""
    url = base.rstrip("/").removesuffix("/v1") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    if "veridraft:engine_busy_seconds" not in text:
        return None
    out = {"prefill": 0.0, "decode": 0.0}  # a phase not run yet has no sample
    out.update({p: float(v) for p, v in _BUSY.findall(text)})
    return out


ORDER_NOTE = (
    "Order: interleaved (ABBA). Each client count's requests ran in two halves, the first in "
    "the table's order of servers and drafters, the second in reverse; each row is both halves."
)


# -- the servers ----------------------------------------------------------------------------------


@dataclass
class Server:
    """One server under test: its process (None for a --base-url server) and /v1 URL, or why it
    did not start. `draft` is the drafter it was started with (llama-server: one per server);
    None when it takes every drafter per request (veridraft)."""

    name: str
    draft: str | None = None
    base: str | None = None
    proc: subprocess.Popen | None = None
    log: object = None  # the file its output goes to
    error: str | None = None

    def serves(self, draft: str) -> bool:
        return self.draft is None or self.draft == draft

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int | None) -> float:
    """A process's peak resident memory (VmHWM of /proc/PID/status) in MB; NaN where unknown."""
    if pid is None:
        return float("nan")
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def _last_line(log) -> str:
    if log is None:
        return ""
    log.flush()
    log.seek(0)
    lines = [ln.strip() for ln in log.read().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def _wait_ready(server: Server, url: str, timeout: float = START_TIMEOUT_S) -> Server:
    """Wait for GET /health to answer 200 (llama-server answers 503 while it loads)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            last = _last_line(server.log)
            server.error = f"{server.name} exited with status {server.proc.returncode}" + (
                f": {last}" if last else ""
            )
            server.stop()
            return server
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                server.base = url + "/v1"
                return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    server.error = f"{server.name} did not answer /health within {timeout:.0f} s"
    return server


def start_veridraft(args) -> Server:
    port = free_port()
    src = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "veridraft.cli", "serve", "--model", args.model,
           "--precision", args.precision, "--port", str(port), "--log-level", "warning",
           "--max-queue", str(max(64, max(args.concurrency))),
           "--max-num-seqs", str(args.max_num_seqs),
           "--kv-cache-tokens", str(args.max_num_seqs * args.ctx_per_slot)]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = Server("veridraft")
    # Its output goes to the terminal, as `veridraft serve`'s does.
    server.proc = subprocess.Popen(cmd, env=env)
    return _wait_ready(server, f"http://127.0.0.1:{port}")


def model_gguf(name: str) -> Path:
    """The GGUF llama-server loads for a model: a .gguf path as given, else the original GGUF of
    a model folder or catalog model (source.gguf, or the file veridraft.json records)."""
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise VeridraftError(f"{p} is not a file")
        return p
    from ..home import home

    folder = p if p.is_dir() else home() / "models" / name
    if not folder.is_dir():
        raise VeridraftError(f"model {name!r} is not pulled: run `veridraft models pull {name}`")
    if (folder / "source.gguf").is_file():
        return folder / "source.gguf"
    try:
        src = json.loads((folder / "veridraft.json").read_text()).get("source_path")
    except (OSError, ValueError):
        src = None
    if src and Path(src).is_file():
        return Path(src)
    raise VeridraftError(f"{folder} has no original GGUF for llama-server (no source.gguf)")


def llama_draft(draft: str) -> tuple[str | None, int | None]:
    """A drafter spec as llama-server runs it: `none` -> (None, None), `model:NAME[:k=K]` ->
    (NAME, K or None for llama.cpp's default draft length). Anything else is a one-line error."""
    from ..spec import as_int, parse

    if draft == "none":
        return None, None
    s = parse(draft, "drafter")
    unknown = set(s.params) - {"k", "num_tokens"}
    if s.name != "model" or not s.arg or unknown:
        raise VeridraftError(
            f"llama-server drafts with a draft model only: use none or model:NAME[:k=K], "
            f"got {draft!r}"
        )
    k = s.params.get("k", s.params.get("num_tokens"))
    return s.arg, None if k is None else as_int("model", "k", k, lo=1)


def llama_server_command(
    binary: str | Path,
    gguf: str | Path,
    *,
    port: int,
    slots: int,
    ctx_per_slot: int,
    threads: int = 0,
    draft_gguf: str | Path | None = None,
    draft_max: int | None = None,
) -> list[str]:
    """llama-server's command line: `slots` parallel slots with continuous batching, a KV cache
    of slots × ctx_per_slot positions (each slot gets its share), and a draft model when given.
    No prompt cache in host memory (--cache-ram 0): veridraft keeps none, and the load test sends
    the same prompts at every level. threads 0 leaves llama.cpp's default."""
    cmd = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--parallel", str(slots), "--cont-batching", "--ctx-size", str(slots * ctx_per_slot),
           "--cache-ram", "0", "--no-webui"]  # fmt: skip
    if threads:
        cmd += ["--threads", str(threads), "--threads-batch", str(threads)]
    if draft_gguf is not None:
        # The draft type is named: llama.cpp infers only its head types (MTP, ...) from a GGUF.
        cmd += ["--model-draft", str(draft_gguf), "--spec-type", "draft-simple"]
        if draft_max is not None:
            cmd += ["--spec-draft-n-max", str(draft_max), "--spec-draft-n-min", "0"]
        if threads:
            cmd += ["--threads-draft", str(threads)]
    return cmd


def start_llama_server(args, draft: str) -> Server:
    """llama-server on the model's GGUF for one drafter; a Server with the reason when it cannot
    start (no binary, no GGUF, a drafter it has no equivalent of, or a process that exits)."""
    from .llama_server import binary_path

    server = Server("llama-server", draft=draft)
    binary = Path(args.llama_server) if args.llama_server else binary_path()
    try:
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise VeridraftError(
                f"llama-server not found at {binary}: `make setup-llama-server` builds it"
            )
        draft_model, draft_max = llama_draft(draft)
        port = free_port()
        cmd = llama_server_command(
            binary,
            model_gguf(args.model),
            port=port,
            slots=args.max_num_seqs,
            ctx_per_slot=args.ctx_per_slot,
            threads=args.threads,
            draft_gguf=model_gguf(draft_model) if draft_model else None,
            draft_max=draft_max,
        )
    except VeridraftError as e:
        server.error = str(e)
        return server
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    # Its log is long: kept in a file, and its last line is the reason if it exits.
    server.log = tempfile.TemporaryFile("w+")
    try:
        server.proc = subprocess.Popen(cmd, stdout=server.log, stderr=subprocess.STDOUT)
    except OSError as e:
        server.error = f"llama-server did not start: {e}"
        server.log.close()
        return server
    return _wait_ready(server, f"http://127.0.0.1:{port}")


# -- the report -----------------------------------------------------------------------------------


def _f(x: float, fmt: str, scale: float = 1.0) -> str:
    return "–" if x != x else format(scale * x, fmt)


def table(rows: list[dict]) -> str:
    head = (
        "| server | drafter | clients | requests | tokens/s (all clients) | TTFT p50 (s) | "
        "TTFT p99 (s) | ITL p50 (ms) | ITL p99 (ms) | tokens/s per stream (median) | τ | "
        "prompt tokens (mean) | peak RSS (MB) | prefill share of engine time | "
        "tokens/s in decode rounds |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lead = f"| {r.get('server', 'veridraft')} | {r['draft']} | {r['clients']} | "
        if r.get("failed"):
            lines.append(lead + f"failed: {r['failed']} |" + " – |" * 11)
            continue
        lines.append(
            lead
            + f"{r['requests']}"
            + (f" ({r['errors']} failed)" if r["errors"] else "")
            + f" | {r['tokens_per_s']:.1f} | {_f(r['ttft_p50_s'], '.2f')} | "
            f"{_f(r['ttft_p99_s'], '.2f')} | {_f(r['itl_p50_s'], '.0f', 1000)} | "
            f"{_f(r['itl_p99_s'], '.0f', 1000)} | {_f(r['stream_tokens_per_s'], '.1f')} | "
            f"{_f(r['tau'], '.2f')} | {r.get('prompt_tokens_mean', 0.0):.0f} | "
            f"{_f(r.get('peak_rss_mb', float('nan')), '.0f')} | "
            f"{_f(r.get('prefill_share', float('nan')), '.0%')} | "
            f"{_f(r.get('decode_tokens_per_s', float('nan')), '.1f')} |"
        )
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--peer",
        default="veridraft",
        help="servers to load, comma-separated: veridraft, llama-server (default: veridraft)",
    )
    p.add_argument(
        "--base-url", default=None, help="a running server's /v1 URL (default: start one)"
    )
    p.add_argument("--api-key", default=os.environ.get("VERIDRAFT_API_KEY", "none"))
    p.add_argument("--model", default=DEFAULT_MODEL, help="catalog name, GGUF file or folder")
    p.add_argument("--precision", default="fp32", help="veridraft's precision (default fp32)")
    p.add_argument(
        "--threads", type=int, default=0, help="each started server's threads (default: its own)"
    )
    p.add_argument(
        "--concurrency", "--clients", default="1,4,16", help="client counts, comma-separated"
    )
    p.add_argument(
        "--drafts",
        default="none,ngram",
        help="drafter specs; 'none' = plain (llama-server: none and model:NAME[:k=K])",
    )
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=8,
        help="the started servers' slots: veridraft's --max-num-seqs, llama-server's --parallel",
    )
    p.add_argument(
        "--ctx-per-slot",
        type=int,
        default=2048,
        help="KV positions per slot: veridraft's --kv-cache-tokens and llama-server's "
        "--ctx-size are slots × this (default 2048)",
    )
    p.add_argument(
        "--llama-server",
        default=None,
        help="the llama-server binary (default: $VERIDRAFT_HOME/bin/llama-server, which "
        "`make setup-llama-server` builds)",
    )
    p.add_argument(
        "--groups",
        default=None,
        help="Spec-Bench task groups the prompts come from, comma-separated (default: all; "
        "mt_bench,math_reasoning,qa have short prompts, summarization and rag long ones)",
    )
    p.add_argument("--requests", type=int, default=0, help="per level (default: max(8, clients))")
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds for the whole run")


def add_loadtest_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "loadtest",
        help="a bounded load run against veridraft serve and llama.cpp's llama-server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run_loadtest)
    return p


def _check(args) -> None:
    try:
        args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    except ValueError:
        raise VeridraftError(
            f"--clients must be integers separated by commas, got {args.concurrency!r}"
        ) from None
    if min(args.concurrency) < 1 or max(args.concurrency) > 64:
        raise VeridraftError("--clients values must be between 1 and 64")
    args.peers = list(dict.fromkeys(s.strip() for s in args.peer.split(",") if s.strip()))
    bad = [s for s in args.peers if s not in PEERS]
    if bad or not args.peers:
        raise VeridraftError(f"--peer {bad[0] if bad else ''!r} is none of {', '.join(PEERS)}")
    if args.base_url and len(args.peers) != 1:
        raise VeridraftError("--base-url names one server: give one --peer with it")
    if args.max_num_seqs < 1 or args.ctx_per_slot < 1:
        raise VeridraftError("--max-num-seqs and --ctx-per-slot must be at least 1")
    groups = getattr(args, "groups", None)
    if isinstance(groups, str):
        from ..bench.questions import default_questions_path, load_questions, select

        args.groups = [g.strip() for g in groups.split(",") if g.strip()] or None
        select(load_questions(default_questions_path()), groups=args.groups, limit=1)


def start_servers(args, drafts: list[str]) -> list[Server]:
    """Every server the run needs, started one after the other before any is measured."""
    if args.base_url:
        name = args.peers[0]
        return [Server(name, draft=None, base=args.base_url)]
    servers = []
    for name in args.peers:
        if name == "veridraft":
            servers.append(start_veridraft(args))
        else:
            servers += [start_llama_server(args, d) for d in drafts]
    for s in servers:
        if s.error:
            print(f"{s.name} ({s.draft or 'every drafter'}): {s.error}", file=sys.stderr)
    return servers


def run_loadtest(args) -> int:
    _check(args)
    drafts = [d.strip() for d in args.drafts.split(",")]
    import openai

    servers = start_servers(args, drafts)
    rows: list[dict] = []
    try:
        prompts = _prompts(max(args.concurrency) * 2, getattr(args, "groups", None))
        clients = {}
        for s in servers:
            if s.error:
                continue
            try:
                client = openai.OpenAI(
                    base_url=s.base, api_key=args.api_key, max_retries=0, timeout=600
                )
                model = client.models.list().data[0].id
                # warm-ups, not counted: one per drafter the server serves (veridraft loads a
                # request's draft model at its first use, which no timed row should pay for)
                for d in [s.draft] if s.draft else drafts:
                    _one(client, model, prompts[0], 8, request_extra(s.name, d))
                clients[id(s)] = (client, model)
            except Exception as e:  # this server's rows fail; the others run
                s.error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        deadline = time.monotonic() + args.time_limit
        for i, c in enumerate(args.concurrency):
            # Alternate which server goes first, so neither always runs on a machine the other
            # has just warmed (or left busy).
            order = args.peers if i % 2 == 0 else args.peers[::-1]
            units = [(name, d) for name in order for d in drafts]
            n = args.requests or max(8, c)
            halves: dict[tuple[str, str], list[Level]] = {u: [] for u in units}
            for (name, d), first, count in abba(units, n):
                s = next(x for x in servers if x.name == name and x.serves(d))
                if s.error:
                    continue
                client, model = clients[id(s)]
                part = [prompts[(first + j) % len(prompts)] for j in range(count)]
                extra = request_extra(name, d)
                before = engine_busy(s.base) if name == "veridraft" else None
                level = run_level(
                    client, model, part, d, c, count, args.max_tokens, deadline, extra
                )
                after = engine_busy(s.base) if before is not None else None
                if after is not None:
                    level.busy = {p: after[p] - before[p] for p in ("prefill", "decode")}
                level.server = name
                level.peak_rss_mb = peak_rss_mb(s.proc.pid if s.proc else None)
                halves[(name, d)].append(level)
            for name, d in units:
                s = next(x for x in servers if x.name == name and x.serves(d))
                if s.error:
                    level = Level(d, c, server=name, failed=s.error)
                else:
                    level = merge(halves[(name, d)])
                rows.append(level.row())
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        print(table(rows))
        print(f"\n{ORDER_NOTE}")
    finally:
        for s in servers:
            s.stop()
    return 1 if any(r["failed"] for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m veridraft.serve.loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_loadtest(args)
    except VeridraftError as e:
        print(f"veridraft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
