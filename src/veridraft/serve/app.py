"""The FastAPI application: OpenAI-compatible routes over `veridraft.generate`.

Every request is validated, tokenized and checked against the context here, before it queues,
so a bad request is answered at once with a 400 and never costs engine time. Generation itself
runs in the engine's worker thread (`engine.py`); this module only turns its events into JSON or
server-sent events.

Reading order: `create_app` (the app, its error handlers and its routes), then the route
handlers, then what they share: request checks (`authorize`, `check_model`, `prepare`), the
queue (`submit`, `outcome`) and streaming (`stream`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import VeridraftError
from ..generate import Generation, generate, prompt_ids_for
from .engine import Engine, Job, QueueFull, ShuttingDown
from .metrics import Metrics, spec_counts
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_request,
)

log = logging.getLogger("veridraft.serve")

# OpenAI's defaults: a client that sends no temperature samples at 1.0, and a completion
# without max_tokens stops after 16 tokens; chat runs to the end of the context.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_COMPLETION_TOKENS = 16
_POLL_S = 0.2  # how often a non-streaming request checks whether its client is still there
_REJECT_REASONS = {400: "invalid", 401: "unauthorized", 404: "not_found"}


@dataclass
class ServerConfig:
    model_names: tuple[str, ...]  # names a request may use in "model" (first: the served id)
    draft: str | None = None  # default drafter spec for requests that do not choose one
    api_key: str | None = None
    max_queue: int = 64
    shutdown_timeout: float = 30.0


@dataclass
class Served:
    """What the route handlers share (`app.state.served`): the model, the settings, the engine
    and the metrics."""

    model: Any  # a veridraft.LoadedModel
    config: ServerConfig
    metrics: Metrics
    engine: Engine = field(init=False)
    job_s: float = 1.0  # running mean of job time, for Retry-After

    @property
    def name(self) -> str:
        return self.config.model_names[0]

    def job_finished(self, job: Job, gen: Generation | None) -> None:
        """The engine's on_finish (worker thread): metrics, and the job time for Retry-After."""
        self.metrics.finished(job, gen)
        if job.started is not None and job.finished is not None:
            self.job_s = 0.8 * self.job_s + 0.2 * (job.finished - job.started)


def create_app(model, config: ServerConfig) -> FastAPI:
    """An app serving `model` (a `veridraft.LoadedModel`)."""
    srv = Served(model, config, Metrics(config.model_names[0]))
    srv.engine = Engine(
        config.max_queue, on_finish=srv.job_finished, on_queue_change=srv.metrics.queue_changed
    )
    srv.metrics.queue_changed(0, 0)

    app = FastAPI(title="veridraft", lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.served, app.state.engine, app.state.metrics = srv, srv.engine, srv.metrics
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for method, path, handler in (
        ("POST", "/v1/chat/completions", chat_completions),
        ("POST", "/v1/completions", completions),
        ("GET", "/v1/models", list_models),
        ("POST", "/tokenize", tokenize),
        ("POST", "/detokenize", detokenize),
        ("GET", "/version", version),
        ("GET", "/health", health),
        ("GET", "/metrics", prometheus),
    ):
        app.add_api_route(path, handler, methods=[method], response_model=None)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    srv: Served = app.state.served
    await asyncio.to_thread(srv.engine.shutdown, srv.config.shutdown_timeout)
    print("veridraft: stopped", file=sys.stderr, flush=True)


def _served(request: Request) -> Served:
    return request.app.state.served


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    if e.status in _REJECT_REASONS:
        _served(request).metrics.reject(_REJECT_REASONS[e.status])
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    err = APIError(e.status_code, str(e.detail), code=str(e.status_code))
    return JSONResponse(err.body(), status_code=e.status_code)


# -- route handlers ------------------------------------------------------------------------------


async def chat_completions(request: Request):
    srv = _served(request)
    req: ChatRequest = await read(request, ChatRequest)
    max_tokens = req.max_completion_tokens or req.max_tokens
    work = await prepare(srv, req, req.chat_messages(), None, max_tokens)
    job = submit(srv, work)
    head = _head("chatcmpl", "chat.completion", srv.name)
    if req.stream:
        head["object"] = "chat.completion.chunk"
        return stream(srv, job, head, _chat_chunk, _include_usage(req))
    return await _whole(request, srv, job, head, _chat_content)


async def completions(request: Request):
    srv = _served(request)
    req: CompletionRequest = await read(request, CompletionRequest)
    work = await prepare(srv, req, req.prompt, False, req.max_tokens)
    job = submit(srv, work)
    head = _head("cmpl", "text_completion", srv.name)
    if req.stream:
        return stream(srv, job, head, _completion_chunk, _include_usage(req))
    return await _whole(request, srv, job, head, lambda gen: {"text": gen.text})


async def list_models(request: Request) -> dict:
    srv = _served(request)
    authorize(request, srv.config)
    card = {
        "id": srv.name,
        "object": "model",
        "created": 0,
        "owned_by": "veridraft",
        "max_model_len": srv.model.context_length,
        # what the server runs: its precision and default drafter ("auto" decides per request)
        "veridraft": {
            "precision": getattr(srv.model, "precision", None),
            "precision_choice": getattr(srv.model, "chosen", "") or None,
            "draft": srv.config.draft or "none",
        },
    }
    return {"object": "list", "data": [card]}


async def tokenize(request: Request) -> dict:
    """vLLM's /tokenize: the ids a completion (`prompt`) or a chat request (`messages`) would
    be given, so a client can count its prompt against `max_model_len` before sending it."""
    srv = _served(request)
    req: TokenizeRequest = await read(request, TokenizeRequest)
    if req.model is not None:
        check_model(req.model, srv.config)
    prompt, chat = req.prompt_or_messages()
    ids = prompt_ids(srv.model, prompt, chat)
    return {"tokens": ids, "count": len(ids), "max_model_len": srv.model.context_length}


async def detokenize(request: Request) -> dict:
    """vLLM's /detokenize: the text of token ids, special tokens kept (so that it tokenizes back
    to the same ids)."""
    srv = _served(request)
    req: DetokenizeRequest = await read(request, DetokenizeRequest)
    if req.model is not None:
        check_model(req.model, srv.config)
    tok = srv.model.tokenizer
    n = tok.vocab_size
    for i, t in enumerate(req.tokens):
        if t >= n:  # the tokenizer would silently drop it
            raise APIError(
                400,
                f"token id {t} (tokens.{i}) is not in this model's vocabulary: ids are 0 to "
                f"{n - 1}",
                param=f"tokens.{i}",
                code="invalid_value",
            )
    return {"prompt": tok.decode(req.tokens)}


async def version() -> dict:
    return {"version": __version__}


async def health(request: Request) -> dict:
    engine = _served(request).engine
    return {"status": "ok", "running": engine.running, "waiting": engine.waiting}


async def prometheus(request: Request) -> Response:
    return Response(_served(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# -- request checks ------------------------------------------------------------------------------


async def read(request: Request, cls):
    """The request's body as `cls`, once its API key is checked (a bad key wins over a bad
    body: a client without the key learns nothing about the request schema)."""
    authorize(request, _served(request).config)
    return parse_request(cls, await request.body())


def authorize(request: Request, config: ServerConfig) -> None:
    if config.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise APIError(
            401,
            "missing API key: send the header 'Authorization: Bearer KEY' "
            "(the openai client's api_key)",
            code="invalid_api_key",
        )
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.strip().encode(), config.api_key.encode()
    ):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


def check_model(name: str, config: ServerConfig) -> None:
    if name not in config.model_names:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {config.model_names[0]!r} "
            "(see /v1/models)",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )


def prompt_ids(model, prompt, chat: bool | None) -> list[int]:
    """Token ids of a raw prompt (chat=False) or of chat messages (chat=None), exactly as
    generation will see them."""
    try:
        return prompt_ids_for(model, prompt, chat)
    except VeridraftError as e:
        raise APIError(400, str(e), param="prompt" if chat is False else "messages") from None


def check_context(ids: list[int], max_tokens: int | None, ctx: int, chat: bool | None) -> int:
    """The request's max_tokens (OpenAI's default when absent), checked against the context."""
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
    if max_tokens is None:
        max_tokens = DEFAULT_COMPLETION_TOKENS if chat is False else ctx - len(ids)
    if len(ids) + max_tokens > ctx:
        raise APIError(
            400,
            f"this model's context length is {ctx} tokens; the prompt has {len(ids)} tokens "
            f"and max_tokens is {max_tokens} ({len(ids) + max_tokens} in all): shorten the "
            "prompt or lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


async def request_drafter(srv: Served, req):
    """The drafter a request asks for in `veridraft.draft` (null, "ar" or "none": none), else
    the server's --draft. Built off the event loop: a model drafter may load a model. "auto"
    stays a spec: generate() picks per prompt (and says what in the request's statistics)."""
    from ..drafters import make_drafter

    opts = req.veridraft
    spec = srv.config.draft
    if opts is not None and "draft" in opts.model_fields_set:
        spec = None if opts.draft in (None, "ar", "none") else opts.draft
    if spec in ("auto", "none"):
        return None if spec == "none" else spec
    try:
        return await asyncio.to_thread(make_drafter, spec, srv.model)
    except VeridraftError as e:
        raise APIError(400, str(e), param="veridraft.draft", code="invalid_draft") from None


async def prepare(srv: Served, req, prompt, chat: bool | None, max_tokens: int | None):
    """Validate what needs the model: prompt length, context, drafter. Returns the job's
    work function."""
    check_model(req.model, srv.config)
    ids = prompt_ids(srv.model, prompt, chat)
    max_tokens = check_context(ids, max_tokens, srv.model.context_length, chat)
    opts = req.veridraft
    kw = dict(
        max_new_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        top_k=opts.top_k if opts is not None else 0,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=req.stops() or None,
        draft=await request_drafter(srv, req),
        chat=chat,
    )
    model = srv.model

    def work(on_text):
        return generate(model, prompt, stream=on_text, **kw)

    return work


# -- the queue -----------------------------------------------------------------------------------


def submit(srv: Served, work) -> Job:
    job = Job(work=work, loop=asyncio.get_running_loop())
    engine = srv.engine
    try:
        engine.submit(job)
    except QueueFull:
        srv.metrics.reject("queue_full")
        wait = max(1, math.ceil(srv.job_s * (engine.waiting + 1)))
        raise APIError(
            429,
            f"the server is busy: {engine.waiting} requests are waiting (limit "
            f"{engine.max_queue}); retry after {wait} s",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(wait)},
        ) from None
    except ShuttingDown:
        raise APIError(503, "the server is shutting down", type="server_error") from None
    return job


def failure(e: BaseException) -> APIError:
    if isinstance(e, VeridraftError):
        return APIError(400, str(e))
    if isinstance(e, ShuttingDown):
        return APIError(503, "the server is shutting down", type="server_error")
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")


async def outcome(request: Request, srv: Served, job: Job) -> Generation | None:
    """Wait for a job's end; None if the client left (the job is then cancelled)."""
    getter = asyncio.ensure_future(job.events.get())
    checked = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=_POLL_S)
            # Text events may arrive faster than the poll period: check on a clock.
            if time.monotonic() - checked >= _POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    srv.engine.cancel(job)
                    return None
            if not done:
                continue
            kind, value = getter.result()
            if kind == "done":
                return value
            if kind == "error":
                raise failure(value)
            if kind == "cancelled":
                return None
            getter = asyncio.ensure_future(job.events.get())
    finally:
        getter.cancel()
        srv.engine.cancel(job)  # a no-op once the job has finished


async def _whole(
    request: Request, srv: Served, job: Job, head: dict, content: Callable[[Generation], dict]
) -> dict | Response:
    """A non-streamed answer: the whole response once the job is done (499 if the client
    left first)."""
    gen = await outcome(request, srv, job)
    if gen is None:
        return Response(status_code=499)
    return _response(head, gen, content(gen))


# -- responses and streaming ---------------------------------------------------------------------


def _head(prefix: str, obj: str, served: str) -> dict:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": served,
    }


def _finish_reason(gen: Generation) -> str:
    return "length" if gen.finish_reason == "length" else "stop"


def _usage(gen: Generation) -> dict:
    n_prompt, n_new = len(gen.prompt_ids), gen.stats.new_tokens
    return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}


def _response(head: dict, gen: Generation, content: dict) -> dict:
    """A whole (not streamed) response in OpenAI's shape: one choice holding `content`."""
    choice = {"index": 0, **content, "logprobs": None, "finish_reason": _finish_reason(gen)}
    return {**head, "choices": [choice], "usage": _usage(gen), "veridraft": request_stats(gen)}


def _chat_content(gen: Generation) -> dict:
    return {"message": {"role": "assistant", "content": gen.text}}


def request_stats(gen: Generation) -> dict:
    """The per-request statistics sent in the `veridraft` field of a response."""
    st = gen.stats
    return {
        "method": st.method,
        "tau": st.tau,
        "alpha": st.alpha,
        "target_forwards": st.target_forwards,
        **{f"num_{k}": v for k, v in spec_counts(st).items()},
        "prefill_s": st.prefill_s,
        "draft_s": st.draft_s,
        "verify_s": st.verify_s,
        "other_s": st.other_s,
        "total_s": st.total_s,
        "tokens_per_s": st.tokens_per_s,
    }


def _include_usage(req) -> bool:
    opts = req.stream_options
    return bool(opts and opts.include_usage)


def _chat_chunk(text: str | None, finish: str | None) -> dict:
    if text is None:  # the opening chunk carries the role, as OpenAI's does
        delta = {"role": "assistant", "content": ""}
    else:
        delta = {"content": text} if text else {}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _completion_chunk(text: str | None, finish: str | None) -> dict | None:
    if text is None:  # completions have no opening chunk
        return None
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def events(srv: Served, job: Job) -> AsyncIterator[tuple[str, object]]:
    """A job's events until its end; closing the iterator (client gone) cancels the job."""
    try:
        while True:
            kind, value = await job.events.get()
            yield kind, value
            if kind in ("done", "error", "cancelled"):
                return
    finally:
        srv.engine.cancel(job)


def stream(srv: Served, job: Job, head: dict, chunk, include_usage: bool) -> StreamingResponse:
    """SSE in OpenAI's shape: chunks, a last chunk with finish_reason, a usage chunk when
    asked, then `data: [DONE]`. `chunk(text, finish_reason)` builds one choice."""
    extra = {"usage": None} if include_usage else {}

    async def body() -> AsyncIterator[str]:
        first = chunk(None, None)
        if first is not None:
            yield _sse({**head, "choices": [first], **extra})
        async for kind, value in events(srv, job):
            if kind == "text":
                yield _sse({**head, "choices": [chunk(value, None)], **extra})
            elif kind == "done":
                gen: Generation = value
                last = {**head, "choices": [chunk("", _finish_reason(gen))], **extra}
                last["veridraft"] = request_stats(gen)
                yield _sse(last)
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(gen)})
            elif kind == "error":
                yield _sse(failure(value).body())
            # "cancelled" only happens when this stream is already closing
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
