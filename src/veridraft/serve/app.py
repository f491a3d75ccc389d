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
from collections.abc import AsyncIterator
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
from ..sampling import SamplingParams
from .engine import BatchWork, Engine, Job, QueueFull, ShuttingDown
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
    # continuous batching: requests in one step at once, and the KV budget they share in
    # positions (None: max_num_seqs full contexts); batch=False serves one request at a time
    max_num_seqs: int = 8
    kv_positions: int | None = None
    batch: bool = True


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

    def job_finished(self, job: Job, result) -> None:
        """The engine's on_finish (worker thread): metrics, and the job time for Retry-After."""
        self.metrics.finished(job, None if result is None else _choices(result))
        if job.started is not None and job.finished is not None:
            self.job_s = 0.8 * self.job_s + 0.2 * (job.finished - job.started)


def create_app(model, config: ServerConfig) -> FastAPI:
    """An app serving `model` (a `veridraft.LoadedModel`). Its engine runs every forward on a
    thread of its own: load the model in a thread that ends before this call, as `veridraft
    serve` does (`veridraft.serve.engine.in_passing_thread`, whose docstring says why)."""
    srv = Served(model, config, Metrics(config.model_names[0]))
    srv.engine = Engine(
        config.max_queue,
        on_finish=srv.job_finished,
        on_queue_change=srv.metrics.queue_changed,
        batcher=make_batcher(model, config) if config.batch else None,
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


def make_batcher(model, config: ServerConfig):
    """The engine's Batcher for `model`: its KV budget, and draft lengths sized per step by
    this machine's cost model when there is one (`veridraft profile`)."""
    from ..batch import Batcher, DraftPlanner
    from ..generate import draft_env

    env = draft_env(model)
    cost = env.cost(model) if env.cost is not None else None
    positions = config.kv_positions or config.max_num_seqs * (model.context_length + 32)
    return Batcher(
        getattr(model, "net", model),
        kv_positions=positions,
        max_num_seqs=config.max_num_seqs,
        planner=DraftPlanner(cost),
    )


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
    top = req.top_count()
    work = await prepare(srv, req, req.chat_messages(), None, max_tokens, top)
    job = submit(srv, work)
    head = _head("chatcmpl", "chat.completion", srv.name)
    tok = srv.model.tokenizer
    if req.stream:
        head["object"] = "chat.completion.chunk"
        return stream(srv, job, head, _chat_chunk(tok), _include_usage(req), req.n)
    return await _whole(request, srv, job, head, _chat_content(tok, top is not None))


async def completions(request: Request):
    srv = _served(request)
    req: CompletionRequest = await read(request, CompletionRequest)
    work = await prepare(srv, req, req.prompt, False, req.max_tokens, req.logprobs)
    job = submit(srv, work)
    head = _head("cmpl", "text_completion", srv.name)
    tok = srv.model.tokenizer
    if req.stream:
        return stream(srv, job, head, _completion_chunk(tok), _include_usage(req), req.n)
    want = req.logprobs is not None
    return await _whole(
        request,
        srv,
        job,
        head,
        lambda c: {"text": c.gen.text, "logprobs": _completion_logprobs(tok, c.logprobs, want)},
    )


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
    srv = _served(request)
    srv.metrics.kv_usage(srv.engine.kv_usage())
    srv.metrics.engine_busy(srv.engine.busy())
    return Response(srv.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


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


def draft_spec(srv: Served, req) -> str | None:
    """The drafter spec a request asks for in `veridraft.draft` (null, "ar" or "none": none),
    else the server's --draft."""
    opts = req.veridraft
    spec = srv.config.draft
    if opts is not None and "draft" in opts.model_fields_set:
        spec = None if opts.draft in (None, "ar", "none") else opts.draft
    return None if spec == "none" else spec


async def request_drafter(srv: Served, req):
    """The request's drafter, built off the event loop (a model drafter may load a model).
    "auto" stays a spec: generate() picks per prompt (and says what in the request's
    statistics)."""
    from ..drafters import make_drafter

    spec = draft_spec(srv, req)
    if spec is None or spec == "auto":
        return spec
    try:
        return await asyncio.to_thread(make_drafter, spec, srv.model)
    except VeridraftError as e:
        raise APIError(400, str(e), param="veridraft.draft", code="invalid_draft") from None


@dataclass
class Choice:
    """One generated choice of a request, with its tokens' log-probabilities when asked."""

    gen: Generation
    logprobs: list | None = None
    index: int = 0


def _choices(result) -> list[Choice]:
    """A job's result as choices: a batched job's list, or the Generation of one run alone."""
    return result if isinstance(result, list) else [Choice(result)]


async def prepare(
    srv: Served, req, prompt, chat: bool | None, max_tokens: int | None, top: int | None = None
):
    """Validate what needs the model: prompt length, context, drafter. Returns the job's work:
    a BatchWork for the batch, or a function of its own (a drafter the batch cannot take)."""
    check_model(req.model, srv.config)
    ids = prompt_ids(srv.model, prompt, chat)
    max_tokens = check_context(ids, max_tokens, srv.model.context_length, chat)
    opts = req.veridraft
    temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    top_k = opts.top_k if opts is not None else 0
    top_p = 1.0 if req.top_p is None else req.top_p
    batcher = srv.engine.batcher
    spec = draft_spec(srv, req)
    if batcher is not None:
        drafters = await batch_drafters(srv, spec, ids, req.n)
        if drafters is not None:
            need = len(ids) + max_tokens + 17
            if need > batcher.alloc.capacity:
                raise APIError(
                    400,
                    f"this request needs {need} KV-cache positions (prompt + max_tokens) and the "
                    f"server's KV budget holds {batcher.alloc.capacity}; lower max_tokens",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
            return batch_work(srv.model, ids, max_tokens, sampling, req, drafters, top)
    if req.n > 1 or top is not None:
        raise APIError(
            400,
            "n > 1 and logprobs need the batching engine, which this request's drafter "
            f"({spec}) does not run in; use another drafter or n=1 without logprobs",
            param="n" if req.n > 1 else "logprobs",
        )
    kw = dict(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=req.seed,
        stop=req.stops() or None,
        draft=await request_drafter(srv, req),
        chat=chat,
    )
    model = srv.model

    def work(on_text):
        return generate(model, prompt, stream=on_text, **kw)

    return work


async def batch_drafters(srv: Served, spec: str | None, ids: list[int], n: int):
    """One drafter per choice for the batch (None entries: plain decoding), or None when the
    drafter reads the target's activations, which a batched forward does not capture."""
    from ..auto import pick_draft
    from ..drafters import make_drafter
    from ..generate import draft_env

    if spec == "auto":
        env = draft_env(srv.model)
        cost = env.cost(srv.model) if env.cost is not None else None
        spec = pick_draft(srv.model, len(ids), cost).value
    if spec is None:
        return [None] * n
    try:
        made = await asyncio.to_thread(lambda: [make_drafter(spec, srv.model) for _ in range(n)])
    except VeridraftError as e:
        raise APIError(400, str(e), param="veridraft.draft", code="invalid_draft") from None
    if any(getattr(made[0], a, None) is not None for a in ("verify_capture", "prompt_capture")):
        return None
    return made


def batch_work(model, ids, max_tokens, sampling, req, drafters, top: int | None) -> BatchWork:
    """The batch requests of one API request: n choices, each with its own drafter and its
    own seed (seed + choice index), its text streamed through a stop-string filter."""
    import torch

    from ..batch import Request as BatchRequest
    from ..generate import TextStream

    tok = model.tokenizer
    stops = req.stops()
    texts: list = []
    pending: list[list] = [[] for _ in drafters]
    logprobs: list[list] = [[] for _ in drafters]

    def requests(on_piece) -> list:
        out = []
        for i, drafter in enumerate(drafters):

            def piece(text, i=i):
                on_piece(i, text, pending[i][:] if top is not None else None)
                pending[i].clear()

            def on_lp(entries, i=i):
                pending[i].extend(entries)
                logprobs[i].extend(entries)

            ts = TextStream(tok, stops, piece)
            texts.append(ts)
            gen = torch.Generator()
            if req.seed is not None:
                gen.manual_seed(req.seed + i)
            else:
                gen.seed()
            out.append(
                BatchRequest(
                    prompt_ids=ids,
                    max_new_tokens=max_tokens,
                    sampling=sampling,
                    generator=gen,
                    drafter=drafter,
                    adaptive=sampling.greedy,
                    eos_ids=frozenset(tok.eos_ids),
                    should_stop=ts.stop_point if stops else None,
                    on_tokens=ts.push if req.stream else None,
                    on_logprobs=on_lp if top is not None else None,
                    tokenizer=tok,
                    logprobs=top,
                )
            )
        return out

    def finish(results) -> list[Choice]:
        choices = []
        for i, (new, stats) in enumerate(results):
            text, reason = texts[i].final(new)
            if req.stream:
                texts[i].flush(text)
                if pending[i]:  # log-probabilities of tokens whose text was held back
                    texts[i].callback("")
            gen = Generation(
                ids=new, text=text, stats=stats, prompt_ids=list(ids), finish_reason=reason
            )
            choices.append(Choice(gen, logprobs[i][: len(new)] if top is not None else None, i))
        return choices

    return BatchWork(requests=requests, finish=finish)


# -- the queue -----------------------------------------------------------------------------------


def submit(srv: Served, work) -> Job:
    loop = asyncio.get_running_loop()
    if isinstance(work, BatchWork):
        job = Job(work=None, loop=loop, batch=work)
    else:
        job = Job(work=work, loop=loop)
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
                if value == "shutdown":  # cut by the server, and the client is still here
                    raise failure(ShuttingDown("the server is shutting down"))
                return None
            getter = asyncio.ensure_future(job.events.get())
    finally:
        getter.cancel()
        srv.engine.cancel(job)  # a no-op once the job has finished


async def _whole(request: Request, srv: Served, job: Job, head: dict, content) -> dict | Response:
    """A non-streamed answer: the whole response once the job is done (499 if the client
    left first). content(choice) builds a choice's content."""
    result = await outcome(request, srv, job)
    if result is None:
        return Response(status_code=499)
    choices = _choices(result)
    out = [
        {"index": c.index, "logprobs": None, **content(c), "finish_reason": _finish_reason(c.gen)}
        for c in choices
    ]
    return {
        **head,
        "choices": out,
        "usage": _usage(choices),
        "veridraft": request_stats(choices[0].gen),
    }


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


def _usage(choices: list[Choice]) -> dict:
    """OpenAI's token counts (completion tokens of every choice), and the speculative
    statistics of the request under vLLM's counter names."""
    n_prompt = len(choices[0].gen.prompt_ids)
    n_new = sum(c.gen.stats.new_tokens for c in choices)
    spec = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0}
    per_pos: list[int] = []
    for c in choices:
        counts = spec_counts(c.gen.stats)
        for k in ("drafts", "draft_tokens", "accepted_tokens"):
            spec[f"num_{k}"] += counts[k]
        for i, v in enumerate(counts["accepted_per_pos"]):
            per_pos[i : i + 1] = [(per_pos[i] if i < len(per_pos) else 0) + v]
    spec["num_accepted_tokens_per_pos"] = per_pos
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_new,
        "total_tokens": n_prompt + n_new,
        "spec_decode": spec,
    }


def _token(tok, i: int) -> str:
    return tok.decode([i])


def _chat_logprobs(tok, entries: list | None) -> dict | None:
    """OpenAI's chat `logprobs`: per token its text, log-probability, bytes and alternatives."""
    if entries is None:
        return None

    def one(i, lp):
        text = _token(tok, i)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {
        "content": [
            {**one(i, lp), "top_logprobs": [one(j, v) for j, v in top]} for i, lp, top in entries
        ]
    }


def _completion_logprobs(tok, entries: list | None, want: bool, offset: int = 0) -> dict | None:
    """The completions API's `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    if not want or entries is None:
        return None
    tokens = [_token(tok, i) for i, _, _ in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [{_token(tok, j): v for j, v in top} for _, _, top in entries],
        "text_offset": offsets,
    }


def _chat_content(tok, want_logprobs: bool):
    def content(c: Choice) -> dict:
        lp = _chat_logprobs(tok, c.logprobs) if want_logprobs else None
        return {"message": {"role": "assistant", "content": c.gen.text}, "logprobs": lp}

    return content


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


def _chat_chunk(tok):
    def chunk(index: int, text: str | None, finish: str | None, lps=None) -> dict:
        if text is None:  # the opening chunk carries the role, as OpenAI's does
            delta = {"role": "assistant", "content": ""}
        else:
            delta = {"content": text} if text else {}
        return {
            "index": index,
            "delta": delta,
            "logprobs": _chat_logprobs(tok, lps),
            "finish_reason": finish,
        }

    return chunk


def _completion_chunk(tok):
    def chunk(index: int, text: str | None, finish: str | None, lps=None) -> dict | None:
        if text is None:  # completions have no opening chunk
            return None
        return {
            "index": index,
            "text": text,
            "logprobs": _completion_logprobs(tok, lps, lps is not None),
            "finish_reason": finish,
        }

    return chunk


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


def stream(
    srv: Served, job: Job, head: dict, chunk, include_usage: bool, n: int = 1
) -> StreamingResponse:
    """SSE in OpenAI's shape: chunks, a last chunk per choice with finish_reason, a usage chunk
    when asked, then `data: [DONE]`. `chunk(index, text, finish_reason, logprobs)` builds one
    choice."""
    extra = {"usage": None} if include_usage else {}

    async def body() -> AsyncIterator[str]:
        for i in range(n):
            first = chunk(i, None, None)
            if first is not None:
                yield _sse({**head, "choices": [first], **extra})
        async for kind, value in events(srv, job):
            if kind == "text":
                index, text, lps = value if isinstance(value, tuple) else (0, value, None)
                yield _sse({**head, "choices": [chunk(index, text, None, lps)], **extra})
            elif kind == "done":
                choices = _choices(value)
                for c in choices:
                    last = {**head, "choices": [chunk(c.index, "", _finish_reason(c.gen))]}
                    last.update(extra)
                    last["veridraft"] = request_stats(c.gen)
                    yield _sse(last)
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(choices)})
            elif kind == "error":
                yield _sse(failure(value).body())
            elif kind == "cancelled" and value == "shutdown":
                # cut by the server's shutdown: the text so far stands, and a last chunk per
                # choice says so, with vLLM's finish reason for an aborted request
                for i in range(n):
                    yield _sse({**head, "choices": [chunk(i, "", "abort")], **extra})
            # any other "cancelled" happens when this stream is already closing
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
