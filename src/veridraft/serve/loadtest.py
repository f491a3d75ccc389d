"""A bounded load run against a veridraft server on loopback, with the openai client.

    python -m veridraft.serve.loadtest --model smollm2-135m --precision fp16w \\
        --concurrency 1,4,16 --drafts none,ngram --max-tokens 48

starts `veridraft serve` on a free loopback port (or uses --base-url), then for each concurrency
level and drafter sends a fixed number of streaming chat requests (Spec-Bench dev questions, first
turns, greedy) from that many client threads, and prints the aggregate tokens/s of all clients,
time to first token and inter-token latency (the gap between streamed chunks, as the client sees
it: with speculation one chunk may carry several tokens), p50 and p99. The drafter is chosen per request (the `veridraft` extension field), so one server
serves every row. Everything is bounded: requests per level, and --time-limit for the whole run.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..defaults import DEFAULT_MODEL


@dataclass
class Result:
    ttft: float
    e2e: float
    tokens: int
    tau: float | None
    gaps: list[float] = field(default_factory=list)  # seconds between streamed chunks


@dataclass
class Level:
    draft: str
    concurrency: int
    wall_s: float = 0.0
    results: list[Result] = field(default_factory=list)
    errors: int = 0

    def row(self) -> dict:
        r = self.results
        toks = sum(x.tokens for x in r)
        ttft = sorted(x.ttft for x in r)
        decode = [(x.tokens - 1) / (x.e2e - x.ttft) for x in r if x.tokens > 1 and x.e2e > x.ttft]
        taus = [x.tau for x in r if x.tau is not None]
        return {
            "draft": self.draft,
            "clients": self.concurrency,
            "requests": len(r),
            "errors": self.errors,
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
        }


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of xs (nearest rank), NaN for none."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def _prompts(n: int) -> list[list[dict]]:
    from ..bench.questions import default_questions_path, load_questions, select

    qs = select(load_questions(default_questions_path()), limit=max(1, n // 6 + 1))
    return [[{"role": "user", "content": q.turns[0]}] for q in qs]


def _one(client, model: str, messages, max_tokens: int, draft: str) -> Result:
    t0 = time.perf_counter()
    ttft = None
    tokens, tau, times = 0, None, []
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"veridraft": {"draft": None if draft == "none" else draft}},
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
    e2e = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(times, times[1:])]
    return Result(ttft if ttft is not None else e2e, e2e, tokens, tau, gaps)


def run_level(client, model, prompts, draft, concurrency, n_requests, max_tokens, deadline):
    level = Level(draft, concurrency)
    lock = threading.Lock()
    todo = list(range(n_requests))

    def worker():
        while True:
            with lock:
                if not todo or time.monotonic() > deadline:
                    return
                i = todo.pop(0)
            try:
                r = _one(client, model, prompts[i % len(prompts)], max_tokens, draft)
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


def _start_server(args) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "veridraft.cli", "serve", "--model", args.model,
           "--precision", args.precision, "--port", str(port), "--log-level", "warning",
           "--max-queue", str(max(64, max(args.concurrency))),
           "--max-num-seqs", str(args.max_num_seqs)]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url + "/v1"
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not start within 300 s")


def table(rows: list[dict]) -> str:
    head = (
        "| drafter | clients | requests | tokens/s (all clients) | TTFT p50 (s) | TTFT p99 (s) | "
        "ITL p50 (ms) | ITL p99 (ms) | tokens/s per stream (median) | τ |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['draft']} | {r['clients']} | {r['requests']}"
            + (f" ({r['errors']} failed)" if r["errors"] else "")
            + f" | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | "
            f"{1000 * r['itl_p50_s']:.0f} | {1000 * r['itl_p99_s']:.0f} | "
            f"{r['stream_tokens_per_s']:.1f} | {r['tau']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m veridraft.serve.loadtest", description=__doc__)
    p.add_argument(
        "--base-url", default=None, help="a running server's /v1 URL (default: start one)"
    )
    p.add_argument("--api-key", default=os.environ.get("VERIDRAFT_API_KEY", "none"))
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--concurrency", default="1,4,16", help="client counts, comma-separated")
    p.add_argument("--drafts", default="none,ngram", help="drafter specs; 'none' = plain")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument(
        "--max-num-seqs", type=int, default=8, help="the started server's --max-num-seqs"
    )
    p.add_argument("--requests", type=int, default=0, help="per level (default: max(8, clients))")
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds for the whole run")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    drafts = [d.strip() for d in args.drafts.split(",")]
    if min(args.concurrency) < 1 or max(args.concurrency) > 64:
        p.error("--concurrency values must be between 1 and 64")

    import openai

    proc = None
    base = args.base_url
    if base is None:
        proc, base = _start_server(args)
    try:
        client = openai.OpenAI(base_url=base, api_key=args.api_key, max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        prompts = _prompts(max(args.concurrency) * 2)
        deadline = time.monotonic() + args.time_limit
        _one(client, model, prompts[0], 8, drafts[0])  # warm-up, not counted
        rows = []
        for c in args.concurrency:
            for d in drafts:  # drafters back to back at each level
                n = args.requests or max(8, c)
                level = run_level(client, model, prompts, d, c, n, args.max_tokens, deadline)
                rows.append(level.row())
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        print(table(rows))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
