"""Request schemas (pydantic, strict: unknown fields and wrong types are rejected) and
OpenAI-shaped error bodies.

Only what the engine can honour is accepted: penalties must be 0, `n` and the number of top
log-probabilities are bounded; such a request gets a 400 that names the field rather than a
silently different answer. veridraft-specific options travel in the `veridraft` extension object, the way vLLM takes
its extra body (`extra_body={"veridraft": {"draft": "ngram"}}` with the openai client).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with a status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


MAX_N = 16  # choices per request (rows of one batch)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class VeridraftOptions(_Strict):
    """The `veridraft` extension object of a request."""

    # A drafter spec ("ngram", "ngram:num_tokens=4", "model:NAME", ...); null or "ar" means
    # plain decoding for this request. Absent: the server's --draft.
    draft: str | None = None
    top_k: Annotated[int, Field(ge=0)] = 0


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Common(_Strict):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI's abuse-tracking field
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    veridraft: VeridraftOptions | None = None

    @field_validator("n")
    @classmethod
    def _choices(cls, v: int) -> int:
        if not 1 <= v <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N} (choices per request)")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v not in (None, 0, 0.0):
            raise ValueError("penalties change the model's output and are not supported; use 0")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return v or None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Common):
    prompt: str
    echo: bool = False
    # the target's log-probability of each emitted token and of this many likeliest ones
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported; send echo=false")
        return v


class ChatRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def chat_messages(self) -> list[dict]:
        return _as_dicts(self.messages)

    def top_count(self) -> int | None:
        """Alternatives per token when log-probabilities are asked, else None."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(
                400,
                "top_logprobs needs logprobs=true; send both",
                param="top_logprobs",
                code="invalid_value",
            )
        return (self.top_logprobs or 0) if self.logprobs else None


def _as_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template takes them."""
    return [{"role": m.role, "content": m.text()} for m in messages]


class TokenizeRequest(_Strict):
    """POST /tokenize (vLLM's): a completion's `prompt` or a chat request's `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None

    def prompt_or_messages(self) -> tuple[str | list[dict], bool | None]:
        """(prompt, chat) as the completion (chat=False) or chat (chat=None) route reads it."""
        if (self.prompt is None) == (self.messages is None):
            raise APIError(
                400,
                "send either 'prompt' (raw text, as /v1/completions takes it) or 'messages' "
                "(as /v1/chat/completions takes them), not "
                + ("both" if self.prompt is not None else "neither"),
                param="prompt",
                code="invalid_value",
            )
        if self.prompt is not None:
            return self.prompt, False
        return _as_dicts(self.messages), None


class DetokenizeRequest(_Strict):
    """POST /detokenize (vLLM's): token ids back to text."""

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def _param(loc: tuple) -> str:
    """'messages.0.content' from pydantic's location, without the union-member tags it adds."""
    parts = [
        str(p)
        for p in loc
        if isinstance(p, int)
        or not (p in _TYPE_TAGS or p[:1].isupper() or "[" in p or "-" in p or "'" in p)
    ]
    return ".".join(parts)


def parse_request(cls: type[_Strict], body: bytes) -> Any:
    """Validate a JSON body; any problem becomes a 400 naming the field."""
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = _param(err["loc"])
        kind = err["type"]
        if kind == "json_invalid":
            raise APIError(
                400, f"the request body is not valid JSON: {err['msg']}", code="invalid_json"
            ) from None
        if not loc:
            raise APIError(
                400, "the request body must be a JSON object", code="invalid_value"
            ) from None
        if kind == "extra_forbidden":
            hint = (
                "veridraft options go in the 'veridraft' object "
                '(e.g. {"veridraft": {"draft": "ngram"}})'
                if "veridraft" in cls.model_fields
                else f"this route takes {', '.join(map(repr, cls.model_fields))}"
            )
            raise APIError(
                400,
                f"unknown field {loc!r}; {hint}",
                param=loc,
                code="unknown_parameter",
            ) from None
        if kind == "missing":
            raise APIError(
                400, f"missing required field {loc!r}", param=loc, code="missing"
            ) from None
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"invalid {loc!r}: {msg}", param=loc, code="invalid_value") from None
