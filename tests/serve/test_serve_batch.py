"""The continuous-batching server (engine.py over batch.py) through the openai client, against an
in-process uvicorn: N concurrent streaming clients each get exactly their answer alone, a client
that leaves mid-stream frees its place, a full queue answers 429, n > 1 choices, logprobs equal
with and without a drafter (the target's own), the speculative counts in `usage`, and vLLM's
latency metrics. The hermetic tests run a tiny float32 model (interleaved forwards); the real
one smollm2-135m in q4a8 (shared forwards), with the counts of what was sent and answered."""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn
from serve_helpers import free_port, make_tiny_model, metric_values, post_json

import veridraft
from veridraft.serve.app import ServerConfig, create_app

NAME = "tiny"
PROMPTS = [
    "Write a short note about the sea.",
    "hello world: one sentence about rivers",
    "apples, pears, plums, cherries; apples, pears, plums, cherries;",
    "the quick brown fox jumps over the lazy dog, the quick brown fox",
]


class Live:
    """The app on 127.0.0.1 in a uvicorn thread of this process (the engine stays reachable)."""

    def __init__(self, app) -> None:
        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return veridraft.load(str(make_tiny_model(tmp_path_factory.mktemp("tiny"), 256)))


@pytest.fixture
def live(tiny, request):
    opts = getattr(request, "param", {})
    cfg = ServerConfig(model_names=(NAME,), **{"max_queue": 8, "max_num_seqs": 4, **opts})
    server = Live(create_app(tiny, cfg))
    yield server
    server.stop()


def _msgs(p: str) -> list[dict]:
    return [{"role": "user", "content": p}]


def _solo(model, prompt, **kw):
    return veridraft.generate(model, _msgs(prompt), draft=None, **kw)


def _stream(client, prompt, **kw) -> tuple[str, str]:
    text, finish = "", None
    for c in client.chat.completions.create(model=NAME, messages=_msgs(prompt), stream=True, **kw):
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
    return text, finish


def test_concurrent_streams_equal_their_answers_alone(tiny, live):
    cases = [
        (PROMPTS[i % 4], dict(max_tokens=20 + 7 * i, temperature=0.0), draft)
        for i, draft in enumerate([None, "ngram", "suffix", None, "ngram", None])
    ]
    cases.append((PROMPTS[0], dict(max_tokens=25, temperature=0.9, seed=5), None))
    want = [
        _solo(
            tiny,
            p,
            max_new_tokens=kw["max_tokens"],
            **{k: v for k, v in kw.items() if k != "max_tokens"},
        ).text  # noqa: E501
        for p, kw, _ in cases
    ]
    client = live.client()

    def run(case):
        p, kw, draft = case
        return _stream(client, p, extra_body={"veridraft": {"draft": draft}}, **kw)[0]

    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(run, cases))
    assert got == want
    m = metric_values(live.url)
    done = sum(v for (n, lab), v in m.items() if n == "vllm:request_success_total")
    print(f"sent {len(cases)}, answered {int(done)}, errored 0, lost {len(cases) - int(done)}")
    assert done == len(cases)
    for name in (
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_queue_time_seconds_count",
    ):
        assert m[(name, (("model_name", NAME),))] >= len(cases) - (name.startswith("vllm:inter"))
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert m[(name, (("model_name", NAME),))] == 0
    assert (("vllm:kv_cache_usage_perc", (("model_name", NAME),))) in m
    # the engine's own clock: prompts and rounds both ran, and the load test reads the same
    busy = {
        ph: m[("veridraft:engine_busy_seconds_total", (("model_name", NAME), ("phase", ph)))]
        for ph in ("prefill", "decode")
    }
    assert busy["prefill"] > 0 and busy["decode"] > 0
    from veridraft.serve.loadtest import engine_busy

    assert engine_busy(live.url + "/v1") == pytest.approx(busy, rel=0.5)


def test_cancel_mid_stream_frees_its_place(tiny, live):
    client = live.client()
    stream = client.chat.completions.create(
        model=NAME, messages=_msgs(PROMPTS[1]), stream=True, max_tokens=200, temperature=0
    )
    seen = 0
    for c in stream:
        seen += bool(c.choices and c.choices[0].delta.content)
        if seen >= 2:
            break
    stream.close()
    engine = live.app.state.engine
    deadline = time.monotonic() + 20
    while engine.running or engine.waiting:
        assert time.monotonic() < deadline, "the cancelled request still holds its place"
        time.sleep(0.05)
    assert engine.kv_usage() == 0.0
    want = _solo(tiny, PROMPTS[2], max_new_tokens=12, temperature=0.0).text
    assert _stream(client, PROMPTS[2], max_tokens=12, temperature=0)[0] == want
    m = metric_values(live.url)
    assert m[("vllm:request_success_total", (("finished_reason", "abort"), ("model_name", NAME)))]


@pytest.mark.parametrize("live", [{"max_queue": 1, "max_num_seqs": 1}], indirect=True)
def test_full_queue_answers_429(live):
    client = live.client()
    engine = live.app.state.engine
    gate = threading.Event()
    results: list = []

    def hold(i):
        s = client.chat.completions.create(
            model=NAME, messages=_msgs(PROMPTS[i]), stream=True, max_tokens=150, temperature=0
        )
        for _ in s:
            gate.wait(20)  # a slow reader: the request stays in the engine
        results.append(i)

    threads = [threading.Thread(target=hold, args=(i,)) for i in (0, 1)]
    threads[0].start()
    deadline = time.monotonic() + 20
    while engine.running < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    threads[1].start()
    while engine.waiting < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=NAME, messages=_msgs(PROMPTS[2]), max_tokens=4)
    assert int(e.value.response.headers["retry-after"]) >= 1
    gate.set()
    for t in threads:
        t.join(60)
    assert sorted(results) == [0, 1]
    print("sent 3, answered 2, rejected 1 (429), lost 0")


def test_shutdown_cuts_a_running_stream_with_a_last_chunk_that_says_so(tiny):
    """The server's shutdown cancels what is still running after its timeout: a stream's text
    so far stands and its last chunk has finish_reason "abort" (its client is still there; a
    client that leaves gets nothing), a whole response is a 503 that says why."""
    server = Live(create_app(tiny, ServerConfig(model_names=(NAME,), max_num_seqs=4)))
    engine = server.app.state.engine
    client = server.client()
    gate = threading.Event()
    out: dict = {}

    def stream():
        text, finish = "", []
        s = client.chat.completions.create(
            model=NAME, messages=_msgs(PROMPTS[0]), stream=True, max_tokens=200, temperature=0
        )
        for c in s:
            if c.choices:
                text += c.choices[0].delta.content or ""
                finish += [c.choices[0].finish_reason] if c.choices[0].finish_reason else []
            gate.wait(20)  # a slow reader: still generating when the shutdown comes
        out["stream"] = (text, finish)

    def whole():
        try:
            client.chat.completions.create(
                model=NAME, messages=_msgs(PROMPTS[1]), max_tokens=200, temperature=0
            )
        except openai.APIStatusError as e:
            out["whole"] = (e.status_code, str(e))

    orig = engine._step

    def held_step():  # 50 ms a step until the gate opens: both requests are still running
        gate.wait(0.05)
        orig()

    engine._step = held_step
    threads = [threading.Thread(target=f) for f in (stream, whole)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while engine.running < 2:
        assert time.monotonic() < deadline, "both requests should be running"
        time.sleep(0.02)
    engine.shutdown(0.0)
    gate.set()
    for t in threads:
        t.join(30)
    server.stop()
    text, finish = out["stream"]
    assert finish == ["abort"], finish
    assert out["whole"][0] == 503 and "shutting down" in out["whole"][1]


def test_n_choices_and_seeds(tiny, live):
    r = live.client().chat.completions.create(
        model=NAME, messages=_msgs(PROMPTS[0]), n=3, max_tokens=15, temperature=1.0, seed=40
    )
    want = [
        _solo(tiny, PROMPTS[0], max_new_tokens=15, temperature=1.0, seed=40 + i).text
        for i in range(3)
    ]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == want
    assert r.usage.completion_tokens == sum(
        len(_solo(tiny, PROMPTS[0], max_new_tokens=15, temperature=1.0, seed=40 + i).ids)
        for i in range(3)
    )


def test_logprobs_are_the_targets_own_with_and_without_a_draft(tiny, live):
    client = live.client()

    def ask(draft, **kw):
        return client.chat.completions.create(
            model=NAME,
            messages=_msgs(PROMPTS[2]),
            max_tokens=30,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            extra_body={"veridraft": {"draft": draft}},
            **kw,
        )

    plain, drafted = ask(None), ask("ngram")
    assert drafted.usage.model_extra["spec_decode"]["num_draft_tokens"] > 0
    assert plain.usage.model_extra["spec_decode"]["num_draft_tokens"] == 0
    lp = [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs])
          for t in plain.choices[0].logprobs.content]  # fmt: skip
    lq = [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs])
          for t in drafted.choices[0].logprobs.content]  # fmt: skip
    assert lp == lq and len(lp) == plain.usage.completion_tokens
    # greedy: each emitted token is the likeliest, and the log-probabilities are normalised
    for tok, v, top in lp:
        assert top[0] == (tok, v) and v <= 0.0
        assert sum(math.exp(a) for _, a in top) <= 1.0 + 1e-6
    # streamed: the same log-probabilities, spread over the chunks
    streamed = []
    for c in ask("ngram", stream=True):
        if c.choices and c.choices[0].logprobs is not None:
            streamed += [(t.token, t.logprob) for t in c.choices[0].logprobs.content]
    assert streamed == [(t, v) for t, v, _ in lp]
    # completions: the legacy shape
    r = client.completions.create(
        model=NAME, prompt=PROMPTS[2], max_tokens=10, temperature=0, logprobs=2
    )
    lg = r.choices[0].logprobs
    assert len(lg.tokens) == len(lg.token_logprobs) == len(lg.top_logprobs) == 10
    assert "".join(lg.tokens) == r.choices[0].text or r.choices[0].text in "".join(lg.tokens)


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_q4a8_concurrent_clients_share_forwards(real_model_dir):
    from veridraft import batch

    real_model_dir("smollm2-135m")
    model = veridraft.load("smollm2-135m", precision="q4a8")
    cfg = ServerConfig(model_names=(NAME,), max_queue=8, max_num_seqs=4)
    app = create_app(model, cfg)
    assert app.state.engine.batcher.batched
    widths: list[int] = []
    orig = batch.Batcher._forward

    def counted(self, seqs, rows):
        widths.append(len(seqs))
        return orig(self, seqs, rows)

    batch.Batcher._forward = counted
    server = Live(app)
    try:
        cases = [(PROMPTS[i], 24 + 4 * i, d) for i, d in enumerate([None, "suffix", "ngram", None])]
        want = [_solo(model, p, max_new_tokens=m, temperature=0.0).text for p, m, _ in cases]
        client = server.client()

        def run(case):
            p, m, d = case
            return _stream(
                client, p, max_tokens=m, temperature=0, extra_body={"veridraft": {"draft": d}}
            )[0]

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(run, cases))
    finally:
        batch.Batcher._forward = orig
        server.stop()
    print(f"sent 4, answered {len(got)}, widest step {max(widths)} requests")
    assert got == want
    assert max(widths) >= 2


# bad requests sent while the batch is full: each refused before it queues, naming its field
BAD_UNDER_LOAD = [
    ({"max_tokens": -5}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"n": 17}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": []}, "messages"),
    ({"veridraft": {"draft": "nosuch"}}, "veridraft.draft"),
    ({"max_tokens": 100000}, "max_tokens"),
]


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_q4a8_fault_matrix_under_load(real_model_dir):
    """Shared forwards on a full batch (2 slots, a queue of 2), with everything at once: six
    streams that must each equal their answer alone (several drafters; a 429 is retried as a
    client would), one cancelled mid-stream, one client that vanishes without reading, and bad
    input at several fields. Counts are printed; no request is lost, the engine ends idle."""
    import socket

    real_model_dir("smollm2-135m")
    model = veridraft.load("smollm2-135m", precision="q4a8")
    cfg = ServerConfig(model_names=(NAME,), max_queue=2, max_num_seqs=2)
    server = Live(create_app(model, cfg))
    engine = server.app.state.engine
    counts = {"sent": 0, "answered": 0, "rejected (429)": 0, "bad input (400)": 0,
              "cancelled": 0, "vanished": 0}  # fmt: skip
    lock = threading.Lock()

    def note(key):
        with lock:
            counts[key] += 1

    good = [(PROMPTS[i % 4], 20 + 3 * i, d) for i, d in
            enumerate([None, "ngram", "suffix", None, "ngram", "suffix"])]  # fmt: skip
    want = [_solo(model, p, max_new_tokens=m, temperature=0.0).text for p, m, _ in good]
    try:
        client = server.client()

        def run_good(case):
            p, m, d = case
            while True:
                note("sent")
                try:
                    text = _stream(client, p, max_tokens=m, temperature=0,
                                   extra_body={"veridraft": {"draft": d}})[0]  # fmt: skip
                except openai.RateLimitError:
                    note("rejected (429)")
                    time.sleep(0.2)
                    continue
                note("answered")
                return text

        def cancel():
            while True:
                note("sent")
                try:
                    s = client.chat.completions.create(
                        model=NAME, messages=_msgs(PROMPTS[1]), stream=True, max_tokens=400
                    )
                    break
                except openai.RateLimitError:
                    note("rejected (429)")
                    time.sleep(0.2)
            for i, _ in enumerate(s):
                if i == 2:
                    break
            s.close()
            note("cancelled")

        def vanish():
            note("sent")
            body = json.dumps({"model": NAME, "messages": _msgs(PROMPTS[3]), "max_tokens": 400,
                               "stream": True}).encode()  # fmt: skip
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body
                )  # fmt: skip
                time.sleep(0.3)
            note("vanished")

        def bad(case):
            fields, param = case
            note("sent")
            body = {"model": NAME, "messages": _msgs("hi"), "max_tokens": 4, **fields}
            status, err, _ = post_json(server.url + "/v1/chat/completions", body)
            assert status == 400 and err["error"]["param"] == param, (fields, status, err)
            note("bad input (400)")

        with ThreadPoolExecutor(16) as pool:
            answers = pool.map(run_good, good)
            others = [pool.submit(cancel), pool.submit(vanish)]
            time.sleep(0.2)  # the batch is full now: the bad requests arrive under load
            others += [pool.submit(bad, c) for c in BAD_UNDER_LOAD]
            got = list(answers)
            for f in others:
                f.result()
        deadline = time.monotonic() + 60
        while engine.running or engine.waiting:  # the cancelled and vanished ones are dropped
            assert time.monotonic() < deadline, "an abandoned request still holds its place"
            time.sleep(0.05)
        usage = engine.kv_usage()
    finally:
        server.stop()
    ended = sum(v for k, v in counts.items() if k != "sent")
    lost = counts["sent"] - ended
    print(", ".join(f"{k} {v}" for k, v in counts.items()) + f", lost {lost}")
    assert got == want
    assert counts["bad input (400)"] == len(BAD_UNDER_LOAD) and counts["cancelled"] == 1
    assert counts["rejected (429)"] >= 1  # 8 requests at once for 2 slots and 2 places
    assert lost == 0 and usage == 0.0
