"""The app in-process (FastAPI's TestClient, and the openai client over it) on a tiny random
model: the routes' shapes, greedy output equal to `veridraft.generate`, /tokenize counting what
a generation request is given, /detokenize, /version, and errors in OpenAI's shape."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient
from serve_helpers import make_tiny_model

import veridraft
from veridraft.generate import prompt_ids_for
from veridraft.serve.app import ServerConfig, create_app

KEY = "test-key"
NAME = "tiny"
CONTEXT = 128
MSGS = [
    {"role": "system", "content": "You write short notes."},
    {"role": "user", "content": "Write a short note about the sea."},
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return veridraft.load(str(make_tiny_model(tmp_path_factory.mktemp("tiny"), CONTEXT)))


@pytest.fixture(scope="module")
def http(model):
    app = create_app(model, ServerConfig(model_names=(NAME,), api_key=KEY, max_queue=4))
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(
        base_url=f"{http.base_url}/v1", api_key=KEY, http_client=http, max_retries=0
    )


def _sse(resp) -> list:
    """The JSON events of a server-sent-events body; asserts it ends with [DONE]."""
    datas = [ln.removeprefix("data: ") for ln in resp.text.splitlines() if ln.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    return [json.loads(d) for d in datas[:-1]]


def _error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "\n" not in err["message"]
    return err


def _rejected(http, reason: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(http.get("/metrics").text):
        for s in fam.samples:
            if s.name == "veridraft:requests_rejected_total" and s.labels["reason"] == reason:
                return s.value
    return 0.0


def test_models_health_version(http):
    models = http.get("/v1/models").json()
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [(NAME, CONTEXT)]
    assert http.get("/health").json() == {"status": "ok", "running": 0, "waiting": 0}
    # /version and /health answer without a key, as vLLM's do
    bare = TestClient(http.app)
    assert bare.get("/version").json() == {"version": veridraft.__version__}
    assert bare.get("/health").status_code == 200
    assert bare.get("/v1/models").status_code == 401
    assert http.get("/metrics").headers["content-type"].startswith("text/plain")


def test_chat_through_the_openai_client_equals_generate(client, model):
    ref = veridraft.generate(model, MSGS, max_new_tokens=12, temperature=0.0)
    r = client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == ref.text and r.model == NAME
    assert r.usage.prompt_tokens == len(ref.prompt_ids)
    assert r.usage.completion_tokens == len(ref.ids)
    assert r.model_extra["veridraft"]["method"] == "ar"
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=MSGS,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ref.prompt_ids)
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_completions_whole_and_streamed(http, model):
    prompt = "the quick brown fox"
    ref = veridraft.generate(model, prompt, max_new_tokens=10, temperature=0.0, chat=False)
    body = {"model": NAME, "prompt": prompt, "max_tokens": 10, "temperature": 0}
    r = http.post("/v1/completions", json=body).json()
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == ref.text
    assert r["usage"]["prompt_tokens"] == len(ref.prompt_ids)
    events = _sse(http.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == ref.text
    assert all("usage" not in e for e in events)  # only when stream_options ask for it
    assert events[-1]["choices"][0]["finish_reason"] == r["choices"][0]["finish_reason"]
    # without max_tokens a completion stops at OpenAI's default of 16 tokens
    r16 = http.post("/v1/completions", json={"model": NAME, "prompt": prompt}).json()
    assert r16["usage"]["completion_tokens"] <= 16


def test_tokenize_counts_what_a_request_is_given(http, model):
    prompt = "hello world: one sentence about rivers"
    r = http.post("/tokenize", json={"model": NAME, "prompt": prompt}).json()
    assert r == {
        "tokens": model.tokenizer.encode(prompt),
        "count": len(model.tokenizer.encode(prompt)),
        "max_model_len": CONTEXT,
    }
    done = http.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 2})
    assert done.json()["usage"]["prompt_tokens"] == r["count"]

    chat = http.post("/tokenize", json={"model": NAME, "messages": MSGS}).json()
    assert chat["tokens"] == prompt_ids_for(model, MSGS)
    assert chat["count"] == len(chat["tokens"]) > r["count"]  # the template's tokens count
    done = http.post(
        "/v1/chat/completions", json={"model": NAME, "messages": MSGS, "max_tokens": 2}
    )
    assert done.json()["usage"]["prompt_tokens"] == chat["count"]
    # "model" may be left out, as vLLM allows
    assert http.post("/tokenize", json={"prompt": prompt}).json()["tokens"] == r["tokens"]


def test_detokenize_round_trips(http, model):
    text = "apples, pears, plums; ünïcode too"
    ids = http.post("/tokenize", json={"model": NAME, "prompt": text}).json()["tokens"]
    assert http.post("/detokenize", json={"model": NAME, "tokens": ids}).json() == {"prompt": text}
    # special tokens are kept: the chat prompt comes back as the template rendered it
    ids = http.post("/tokenize", json={"messages": MSGS}).json()["tokens"]
    got = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert got == model.tokenizer.apply_chat_template(MSGS) and "<|im_start|>" in got
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


ROBOT = [{"role": "robot", "content": "x"}]
BAD = [
    # (name, path, body, status, param, words in the message)
    ("prompt and messages", "/tokenize", {"prompt": "x", "messages": MSGS}, 400, "prompt", "both"),
    ("neither", "/tokenize", {"model": NAME}, 400, "prompt", "neither"),
    ("prompt not text", "/tokenize", {"prompt": [1, 2]}, 400, "prompt", "string"),
    ("empty messages", "/tokenize", {"messages": []}, 400, "messages", "at least 1"),
    ("bad role", "/tokenize", {"messages": ROBOT}, 400, "messages.0.role", "'user'"),
    ("unknown field", "/tokenize", {"prompt": "x", "n": 2}, 400, "n", "this route takes"),
    ("unknown model", "/tokenize", {"model": "gpt-9", "prompt": "x"}, 404, "model", "/v1/models"),
    ("not json", "/tokenize", b'{"prompt": ', 400, None, "JSON"),
    ("negative id", "/detokenize", {"tokens": [5, 6, -1]}, 400, "tokens.2", ">= 0"),
    ("id past vocabulary", "/detokenize", {"tokens": [5, 10**6]}, 400, "tokens.1", "0 to"),
    ("id as text", "/detokenize", {"tokens": ["5"]}, 400, "tokens.0", "integer"),
    ("no tokens", "/detokenize", {"model": NAME}, 400, "tokens", "missing"),
    ("detokenize unknown model", "/detokenize", {"model": "x", "tokens": [1]}, 404, "model", ""),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_tokenize_input(http, case):
    name, path, body, status, param, words = case
    before = _rejected(http, "invalid" if status == 400 else "not_found")
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    err = _error(resp, status)
    assert err["param"] == param
    assert words.replace(">= 0", "greater than or equal to 0") in err["message"]
    after = _rejected(http, "invalid" if status == 400 else "not_found")
    assert after == before + 1


def test_tokenize_needs_the_key(http):
    bare = TestClient(http.app)
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        assert _error(bare.post(path, json=body), 401)["code"] == "invalid_api_key"


def test_generation_errors_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=CONTEXT)
    assert e.value.body["code"] == "context_length_exceeded"
    assert str(CONTEXT) in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="", max_tokens=4)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=NAME, messages=MSGS, max_tokens=4, extra_body={"veridraft": {"draft": "nosuch"}}
        )
    assert e.value.body["param"] == "veridraft.draft"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSGS, max_tokens=4)
    r = client.chat.completions.create(model=NAME, messages=MSGS, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1  # still serving
