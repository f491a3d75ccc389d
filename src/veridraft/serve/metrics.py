"""Prometheus metrics under vLLM's names, so dashboards built for vLLM (and llama.cpp, which
adopted the same speculative-decoding counters) read a veridraft server unchanged.

Counters are exposed with the `_total` suffix, as vLLM's are. Mapping from `Stats`:

- `vllm:spec_decode_num_drafts` = verification rounds that checked at least one drafted token
  (`drafted_per_pos[0]`); rounds where the drafter had nothing to propose are plain decoding
  steps and, as in vLLM, are not drafts. Mean acceptance length = 1 + accepted / drafts.
- `vllm:spec_decode_num_draft_tokens` = `drafted`, `vllm:spec_decode_num_accepted_tokens` =
  `accepted`, `..._per_pos{position="i"}` = `accepted_per_pos[i]` (0-based, as vLLM).

Only completed requests add to the token and acceptance counters (a cancelled generation has no
statistics). `vllm:inter_token_latency_seconds` observes the gap between consecutive pieces of
streamed text: one verification round may commit several tokens, as one vLLM engine step does
with speculative decoding. The draft / verify split has no vLLM name: `veridraft:*_seconds`.

`veridraft:engine_busy_seconds{phase="prefill"|"decode"}` is the batch loop's own time in
prompt chunks and in decoding rounds. Its steps run one after another, so over a window the two
add up to the time the engine worked, and prefill / (prefill + decode) is the share of it that
went to prompts. (`veridraft:prefill_seconds` sums each request's admission-to-first-token time,
which overlaps between concurrent requests.)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..stats import Stats

# vLLM's buckets (vllm/v1/metrics/loggers.py), so histograms line up on shared dashboards.
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
         10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0)  # fmt: skip
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
        240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


def spec_counts(stats: Stats) -> dict:
    """The vLLM spec-decode counter increments of one generation."""
    return {
        "drafts": stats.drafted_per_pos[0] if stats.drafted_per_pos else 0,
        "draft_tokens": stats.drafted,
        "accepted_tokens": stats.accepted,
        "accepted_per_pos": list(stats.accepted_per_pos),
    }


class Metrics:
    """All server metrics in one registry of their own (several apps may live in one process)."""

    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        lab = ["model_name"]

        def counter(name, doc, extra=()):
            return Counter(name, doc, lab + list(extra), registry=r)

        def hist(name, doc, buckets):
            return Histogram(name, doc, lab, buckets=buckets, registry=r)

        self.drafts = counter("vllm:spec_decode_num_drafts", "Verification rounds with a draft")
        self.draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Drafted tokens")
        self.accepted = counter("vllm:spec_decode_num_accepted_tokens", "Accepted draft tokens")
        self.accepted_pos = counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens per draft position (0-based)",
            ["position"],
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated")
        self.requests = counter(
            "vllm:request_success",
            "Finished requests by reason (stop, length, abort, error)",
            ["finished_reason"],
        )
        self.rejected = counter(
            "veridraft:requests_rejected", "Requests refused before queueing", ["reason"]
        )
        self.ttft = hist(
            "vllm:time_to_first_token_seconds", "Arrival to first text (queue included)", _TTFT
        )
        self.itl = hist(
            "vllm:inter_token_latency_seconds", "Gap between consecutive streamed pieces", _ITL
        )
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Arrival to the last token", _E2E)
        self.queue_time = hist(
            "vllm:request_queue_time_seconds", "Time spent waiting for the engine", _E2E
        )
        self.tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Decode time / (generated tokens - 1)",
            _ITL,
        )
        self.running = Gauge(
            "vllm:num_requests_running", "Requests being generated", lab, registry=r
        )
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests in the queue", lab, registry=r)
        self.kv = Gauge(
            "vllm:kv_cache_usage_perc",
            "Fraction of the KV-cache budget held by admitted requests (1 = full)",
            lab,
            registry=r,
        )
        self.phase = {
            p: counter(f"veridraft:{p}_seconds", f"Time spent in {p} (all requests)")
            for p in ("prefill", "draft", "verify", "other")
        }
        self.busy = counter(
            "veridraft:engine_busy_seconds",
            "The batch loop's time in prompt chunks (prefill) and decoding rounds (decode)",
            ["phase"],
        )
        self._busy_seen: dict[str, float] = {}

    def engine_busy(self, seconds: dict[str, float]) -> None:
        """Bring the busy counters up to the engine's running totals."""
        for phase, total in seconds.items():
            step = total - self._busy_seen.get(phase, 0.0)
            if step > 0:
                self.busy.labels(self.model_name, phase).inc(step)
                self._busy_seen[phase] = total

    def queue_changed(self, running: int, waiting: int) -> None:
        self.running.labels(self.model_name).set(running)
        self.waiting.labels(self.model_name).set(waiting)

    def kv_usage(self, fraction: float) -> None:
        self.kv.labels(self.model_name).set(fraction)

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def finished(self, job, choices) -> None:
        """Record one job that ran (choices: its generated choices, each with a `gen`, when it
        completed, else None)."""
        m = self.model_name
        if job.started is not None:
            self.queue_time.labels(m).observe(job.started - job.arrival)
        if choices is None:
            self.requests.labels(m, job.outcome).inc()
            return
        gen = choices[0].gen
        reason = "length" if gen.finish_reason == "length" else "stop"
        self.requests.labels(m, reason).inc()
        for i, c in enumerate(choices):  # n choices share one prompt
            self._tokens(c.gen.stats, prompt=i == 0)
        first = job.first_piece if job.first_piece is not None else job.finished
        self.ttft.labels(m).observe(first - job.arrival)
        for a, b in zip(job.piece_times, job.piece_times[1:]):
            self.itl.labels(m).observe(b - a)
        self.e2e.labels(m).observe(job.finished - job.arrival)
        st: Stats = gen.stats
        if st.new_tokens > 1:
            self.tpot.labels(m).observe(st.decode_s / (st.new_tokens - 1))

    def _tokens(self, st: Stats, prompt: bool) -> None:
        """A choice's token and acceptance counts."""
        m = self.model_name
        if prompt:
            self.prompt_tokens.labels(m).inc(st.prompt_tokens)
        self.generation_tokens.labels(m).inc(st.new_tokens)
        c = spec_counts(st)
        self.drafts.labels(m).inc(c["drafts"])
        self.draft_tokens.labels(m).inc(c["draft_tokens"])
        self.accepted.labels(m).inc(c["accepted_tokens"])
        for pos, n in enumerate(c["accepted_per_pos"]):
            self.accepted_pos.labels(m, str(pos)).inc(n)
        for p in self.phase:
            self.phase[p].labels(m).inc(getattr(st, f"{p}_s"))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
