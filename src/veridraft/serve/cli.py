"""`veridraft serve`: argument parsing and start-up. Imports torch and the web stack only when the
command runs, so that `veridraft --help` stays light."""

from __future__ import annotations

import argparse
import os
import sys
import threading

from ..defaults import DEFAULT_MODEL

# uvicorn's graceful-shutdown timeout is --shutdown-timeout plus this: time for a cancelled
# job's stream to end and its connection to close before uvicorn cancels what is left
SHUTDOWN_MARGIN_S = 10.0


def add_serve_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible server (/v1/chat/completions, /v1/completions, "
        "/v1/models; vLLM's /tokenize, /detokenize and /version; /health, /metrics). Requests "
        "are batched continuously: up to --max-num-seqs share each target forward (in bf16, q4 "
        "and q4a8; fp32 and fp16w interleave their forwards), each answer bitwise its answer "
        "alone; the rest wait first come, first served.",
    )
    s.add_argument(
        "--model", "-m", default=DEFAULT_MODEL, help="catalog name, GGUF file or HF folder"
    )
    s.add_argument(
        "--draft",
        default="auto",
        help="default drafter: auto (default: chosen per request for its prompt, or none) | "
        "none | suffix | ngram | layerskip | model:NAME | ...",
    )
    s.add_argument(
        "--precision",
        default="auto",
        help="auto (default: the fastest mode this CPU runs for the model) | fp32 (the "
        "reference) | fp16w | bf16 | q4 | q4a8",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key",
        default=os.environ.get("VERIDRAFT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes, /tokenize and /detokenize "
        "(default: $VERIDRAFT_API_KEY)",
    )
    s.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests that may wait for the engine; more are answered 429 (default 64)",
    )
    s.add_argument(
        "--max-num-seqs",
        type=int,
        default=8,
        help="requests generated together (one batch step each round; default 8)",
    )
    s.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=0,
        help="KV-cache positions the batch shares (a request holds prompt + max_tokens); a "
        "request that does not fit waits (default: --max-num-seqs full contexts)",
    )
    s.add_argument(
        "--no-batch",
        action="store_true",
        help="one generation at a time, as a single-user server",
    )
    s.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: the name)"
    )
    s.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on shutdown before they are cancelled",
    )
    s.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
    s.add_argument(
        "--print-vllm-config",
        action="store_true",
        help="print vLLM's speculative_config (and the vllm serve command) for --draft, and exit",
    )
    s.set_defaults(func=run_serve)
    return s


def _print_vllm_config(args: argparse.Namespace) -> int:
    import json

    from .vllm import speculative_config, vllm_command

    if not args.draft or args.draft in ("auto", "none"):
        print(
            "veridraft: error: --print-vllm-config needs --draft SPEC (e.g. --draft ngram)",
            file=sys.stderr,
        )
        return 2
    cfg, notes = speculative_config(args.draft, args.model)
    cmd, _ = vllm_command(args.model, args.draft, args.port)
    print(json.dumps(cfg))
    print(f"# {cmd}", file=sys.stderr)
    for note in notes:
        print(f"# note: {note}", file=sys.stderr)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from ..errors import VeridraftError

    if args.print_vllm_config:
        return _print_vllm_config(args)
    if args.max_queue < 0:
        raise VeridraftError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_num_seqs < 1:
        raise VeridraftError(f"--max-num-seqs must be at least 1, got {args.max_num_seqs}")
    if args.kv_cache_tokens < 0:
        raise VeridraftError(
            f"--kv-cache-tokens must be a positive number of positions, got {args.kv_cache_tokens}"
        )
    import torch
    import uvicorn

    from ..drafters import make_drafter
    from ..generate import generate
    from ..loader import load
    from .app import ServerConfig, create_app
    from .engine import in_passing_thread

    if args.threads:
        torch.set_num_threads(args.threads)  # a process-wide count: the engine thread's too

    def prepare():
        model = load(args.model, precision=args.precision)
        if args.draft not in ("auto", "none"):
            make_drafter(args.draft, model)  # a bad --draft fails here, not on the first request
        # One short generation so the first client does not pay for lazy initialisation.
        generate(model, "Hello", max_new_tokens=2, draft=args.draft)
        return model

    model = in_passing_thread(prepare)
    names = tuple(dict.fromkeys(n for n in (args.served_model_name, model.name, args.model) if n))
    config = ServerConfig(
        model_names=names,
        draft=args.draft,
        api_key=args.api_key or None,
        max_queue=args.max_queue,
        shutdown_timeout=args.shutdown_timeout,
        max_num_seqs=args.max_num_seqs,
        kv_positions=args.kv_cache_tokens or None,
        batch=not args.no_batch,
    )
    app = create_app(model, config)
    print(
        f"veridraft: serving {names[0]} ({model.precision}, draft {args.draft or 'none'}) on "
        f"http://{args.host}:{args.port}/v1" + (f"; {model.chosen}" if model.chosen else ""),
        file=sys.stderr,
        flush=True,
    )
    engine, timeout = app.state.engine, args.shutdown_timeout

    class Server(uvicorn.Server):
        """Starts the engine's shutdown at the signal itself: the running job gets
        --shutdown-timeout seconds, then is cancelled and its stream ends as a stream does, so
        the connection closes on its own. uvicorn's own timeout comes later and only catches
        what is still open then: it cancels a request's task mid-response, which it logs as an
        "Exception in ASGI application" traceback."""

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                threading.Thread(target=engine.shutdown, args=(timeout,), daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=timeout + SHUTDOWN_MARGIN_S,
    )
    Server(config).run()
    return 0
