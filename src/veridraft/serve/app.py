"""The FastAPI application: OpenAI-compatible routes over `veridraft.generate`.

Every request is validated, tokenized and checked against the context here, before it queues,
so a bad request is answered at once with a 400 and never costs engine time. Generation itself
runs in the engine's worker thread (`engine.py`); this module only turns its events into JSON or
server-sent events.
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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import VeridraftError
from ..generate import Generation, generate, prompt_ids_for
from .engine import Engine, Job, QueueFull, ShuttingDown
from .metrics import Metrics, spec_counts
from .protocol import APIError, ChatRequest, CompletionRequest, parse_request

log = logging.getLogger("veridraft.serve")

# OpenAI's defaults: a client that sends no temperature samples at 1.0, and a completion
# without max_tokens stops after 16 tokens; chat runs to the end of the context.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_COMPLETION_TOKENS = 16
_POLL_S = 0.2  # how often a non-streaming request checks whether its client is still there


@dataclass
class ServerConfig:
    model_names: tuple[str, ...]  # names a request may use in "model" (first: the served id)
    draft: str | None = None  # default drafter spec for requests that do not choose one
    api_key: str | None = None
    max_queue: int = 64
    shutdown_timeout: float = 30.0


def _finish_reason(gen: Generation) -> str:
    return "length" if gen.finish_reason == "length" else "stop"


def _usage(gen: Generation) -> dict:
    n_prompt, n_new = len(gen.prompt_ids), gen.stats.new_tokens
    return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}


def _response(head: dict, gen: Generation, content: dict) -> dict:
    """A whole (not streamed) response in OpenAI's shape: one choice holding `content`."""
    choice = {"index": 0, **content, "logprobs": None, "finish_reason": _finish_reason(gen)}
    return {**head, "choices": [choice], "usage": _usage(gen), "veridraft": request_stats(gen)}


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


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(model, config: ServerConfig) -> FastAPI:
    """An app serving `model` (a `veridraft.LoadedModel`)."""
    from ..drafters import make_drafter

    served = config.model_names[0]
    metrics = Metrics(served)
    recent = {"job_s": 1.0}  # running mean of job time, for Retry-After

    def on_finish(job: Job, gen) -> None:
        metrics.finished(job, gen)
        if job.started is not None and job.finished is not None:
            recent["job_s"] = 0.8 * recent["job_s"] + 0.2 * (job.finished - job.started)

    engine = Engine(config.max_queue, on_finish=on_finish, on_queue_change=metrics.queue_changed)
    metrics.queue_changed(0, 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(engine.shutdown, config.shutdown_timeout)
        print("veridraft: stopped", file=sys.stderr, flush=True)

    app = FastAPI(title="veridraft", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        if e.status in (400, 401, 404):
            metrics.reject({400: "invalid", 401: "unauthorized", 404: "not_found"}[e.status])
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        err = APIError(e.status_code, str(e.detail), code=str(e.status_code))
        return JSONResponse(err.body(), status_code=e.status_code)

    def authorize(request: Request) -> None:
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

    def check_model(name: str) -> None:
        if name not in config.model_names:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {served!r} "
                "(see /v1/models)",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )

    async def prepare(req, prompt, chat: bool | None, max_tokens: int | None):
        """Validate what needs the model: prompt length, context, drafter. Returns the job's
        work function."""
        check_model(req.model)
        try:
            ids = prompt_ids_for(model, prompt, chat)
        except VeridraftError as e:
            raise APIError(400, str(e), param="prompt" if chat is False else "messages") from None
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        ctx = model.context_length
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
        opts = req.veridraft
        spec = config.draft
        if opts is not None and "draft" in opts.model_fields_set:
            spec = None if opts.draft in (None, "ar") else opts.draft
        try:
            drafter = await asyncio.to_thread(make_drafter, spec, model)
        except VeridraftError as e:
            raise APIError(400, str(e), param="veridraft.draft", code="invalid_draft") from None
        kw = dict(
            max_new_tokens=max_tokens,
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_k=opts.top_k if opts is not None else 0,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=req.stops() or None,
            draft=drafter,
            chat=chat,
        )

        def work(on_text):
            return generate(model, prompt, stream=on_text, **kw)

        return work

    def submit(work) -> Job:
        job = Job(work=work, loop=asyncio.get_running_loop())
        try:
            engine.submit(job)
        except QueueFull:
            metrics.reject("queue_full")
            wait = max(1, math.ceil(recent["job_s"] * (engine.waiting + 1)))
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

    async def outcome(request: Request, job: Job) -> Generation | None:
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
                        engine.cancel(job)
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
            engine.cancel(job)  # a no-op once the job has finished

    async def events(job: Job) -> AsyncIterator[tuple[str, object]]:
        """A job's events until its end; closing the iterator (client gone) cancels the job."""
        try:
            while True:
                kind, value = await job.events.get()
                yield kind, value
                if kind in ("done", "error", "cancelled"):
                    return
        finally:
            engine.cancel(job)

    def stream(job: Job, head: dict, chunk, include_usage: bool) -> StreamingResponse:
        """SSE in OpenAI's shape: chunks, a last chunk with finish_reason, a usage chunk when
        asked, then `data: [DONE]`. `chunk(text, finish_reason)` builds one choice."""
        extra = {"usage": None} if include_usage else {}

        async def body() -> AsyncIterator[str]:
            first = chunk(None, None)
            if first is not None:
                yield _sse({**head, "choices": [first], **extra})
            async for kind, value in events(job):
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

    async def read(request: Request, cls):
        authorize(request)
        return parse_request(cls, await request.body())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatRequest = await read(request, ChatRequest)
        max_tokens = req.max_completion_tokens or req.max_tokens
        work = await prepare(req, req.chat_messages(), None, max_tokens)
        job = submit(work)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served,
        }
        if req.stream:
            head["object"] = "chat.completion.chunk"

            def chunk(text, finish):
                if text is None:  # the opening chunk carries the role, as OpenAI's does
                    delta = {"role": "assistant", "content": ""}
                else:
                    delta = {"content": text} if text else {}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

            opts = req.stream_options
            return stream(job, head, chunk, bool(opts and opts.include_usage))
        gen = await outcome(request, job)
        if gen is None:
            return Response(status_code=499)
        return _response(head, gen, {"message": {"role": "assistant", "content": gen.text}})

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await read(request, CompletionRequest)
        work = await prepare(req, req.prompt, False, req.max_tokens)
        job = submit(work)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": served,
        }
        if req.stream:

            def chunk(text, finish):
                if text is None:
                    return None
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

            opts = req.stream_options
            return stream(job, head, chunk, bool(opts and opts.include_usage))
        gen = await outcome(request, job)
        if gen is None:
            return Response(status_code=499)
        return _response(head, gen, {"text": gen.text})

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": served,
                    "object": "model",
                    "created": 0,
                    "owned_by": "veridraft",
                    "max_model_len": model.context_length,
                }
            ],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
