"""Request validation without a server: every problem is a 400 naming the field."""

from __future__ import annotations

import json

import pytest

from veridraft.serve.protocol import APIError, ChatRequest, CompletionRequest, parse_request

OK = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _chat(**fields) -> bytes:
    body = {**OK, **fields}
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def test_valid_request_keeps_its_fields():
    req = parse_request(
        ChatRequest,
        _chat(
            max_completion_tokens=5,
            temperature=0,
            stop="x",
            stream=True,
            stream_options={"include_usage": True},
            veridraft={"draft": None},
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
        ),
    )
    assert req.chat_messages() == [{"role": "user", "content": "ab"}]
    assert req.stops() == ["x"] and req.stream_options.include_usage
    assert "draft" in req.veridraft.model_fields_set and req.veridraft.draft is None


@pytest.mark.parametrize(
    "body, param, code",
    [
        (b"{", None, "invalid_json"),
        (b"[]", None, "invalid_value"),
        (_chat(messages=None), "messages", "missing"),
        (_chat(messages=[{"role": "user"}]), "messages.0.content", "missing"),
        (_chat(max_tokens=0), "max_tokens", "invalid_value"),
        (_chat(max_tokens=True), "max_tokens", "invalid_value"),
        (_chat(temperature="hot"), "temperature", "invalid_value"),
        (_chat(top_p=1.5), "top_p", "invalid_value"),
        (_chat(n=0), "n", "invalid_value"),
        (_chat(n=17), "n", "invalid_value"),
        (_chat(stop=["a", ""]), "stop", "invalid_value"),
        (_chat(stop=5), "stop", "invalid_value"),
        (_chat(frequency_penalty=0.5), "frequency_penalty", "invalid_value"),
        (_chat(logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value"),
        (_chat(logprobs="yes"), "logprobs", "invalid_value"),
        (_chat(tools=[]), "tools", "unknown_parameter"),
        (_chat(veridraft={"top_k": -1}), "veridraft.top_k", "invalid_value"),
        (
            _chat(stream_options={"include_usage": "yes"}),
            "stream_options.include_usage",
            "invalid_value",
        ),  # fmt: skip
    ],
)
def test_bad_chat_requests(body, param, code):
    with pytest.raises(APIError) as e:
        parse_request(ChatRequest, body)
    err = e.value
    assert err.status == 400 and err.code == code and err.param == param
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_completion_rejects_echo_and_token_prompts():
    for body, param in (
        ({"model": "m", "prompt": "x", "echo": True}, "echo"),
        ({"model": "m", "prompt": [1, 2, 3]}, "prompt"),
    ):
        with pytest.raises(APIError) as e:
            parse_request(CompletionRequest, json.dumps(body).encode())
        assert e.value.param == param
