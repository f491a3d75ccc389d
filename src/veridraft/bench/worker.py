"""Peers that load native libraries run in a worker process of their own, so that a crash there
(SIGILL from a llama.cpp build for another CPU, a segfault, an abort) is that method's failure
and not the end of the benchmark.

The parent (`WorkerMethod`) and the worker (`python -m veridraft.bench.worker`) speak JSON lines
over the worker's stdin/stdout: `prepare` builds the in-process method from a factory
("module:function", called as factory(spec, model, threads=...)), `run` times one generation
inside the worker (the timed region is the same as in-process: the generation call only), and
`close` ends it. A worker that dies is reported with its signal or exit code; the next run starts
a fresh one.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from ..errors import VeridraftError
from .base import Method, RunOutput
from .memory import peak_rss_mb, peak_rss_reset

ENGINE_NAMES = {"llamacpp": "llama.cpp", "hf": "transformers", "kvpress": "kvpress"}


class WorkerDied(RuntimeError):
    """The worker process of a peer ended while it was asked to do something."""


@dataclass
class PeerTokenizer:
    eos_ids: set[int] = field(default_factory=set)


@dataclass
class PeerModel:
    """What a peer needs of veridraft's loaded model, sent to the worker as JSON."""

    name: str
    path: str | None = None
    gguf_path: str | None = None
    context_length: int | None = None
    eos_ids: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, model) -> PeerModel:
        gguf = getattr(model, "gguf_path", None)
        path = getattr(model, "path", None)
        return cls(
            name=str(model.name),
            path=None if path is None else str(path),
            gguf_path=None if gguf is None else str(gguf),
            context_length=getattr(model, "context_length", None),
            eos_ids=sorted(model.tokenizer.eos_ids),
        )

    @property
    def tokenizer(self) -> PeerTokenizer:
        return PeerTokenizer(set(self.eos_ids))


def death_reason(returncode: int | None) -> str:
    """`signal SIGILL (Illegal instruction)` for a killed process, `exit code N` otherwise."""
    if returncode is None:
        return "closed its output"
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"signal {-returncode}"
        return f"signal {sig.name} ({signal.strsignal(sig) or sig.name})"
    return f"exit code {returncode}"


# --------------------------------------------------------------------------------------------
# parent side


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])  # the directory that holds `veridraft/`


class WorkerMethod(Method):
    """A peer method that runs in its own worker process (one per method)."""

    def __init__(
        self, spec: str, model, factory: str, threads: int = 2, python: str | None = None
    ) -> None:
        super().__init__(spec)
        self.python = python or sys.executable  # a peer may need a venv of its own (kvpress)
        self.engine = spec.split(":", 1)[0]
        self.model = PeerModel.of(model)
        self.factory = factory
        self.threads = threads
        self.proc: subprocess.Popen | None = None
        self.label = ENGINE_NAMES.get(self.engine, self.engine)

    def _start(self) -> dict:
        env = dict(os.environ)
        # The worker imports this very package, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_package_root(), env.get("PYTHONPATH")) if p
        )
        self.proc = subprocess.Popen(
            [self.python, "-m", "veridraft.bench.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )
        return self._ask(
            {
                "op": "prepare",
                "factory": self.factory,
                "spec": self.name,
                "model": asdict(self.model),
                "threads": self.threads,
            }
        )

    def _ask(self, request: dict) -> dict:
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            rc = proc.wait()
            self.proc = None
            raise WorkerDied(f"{self.label} worker died: {death_reason(rc)}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise VeridraftError(f"{self.name}: {reply.get('error', 'the worker failed')}")
        return reply

    def prepare(self) -> None:
        try:
            reply = self._start()
        except (WorkerDied, VeridraftError) as e:
            # a peer that cannot start (a crash, a model it cannot load) is skipped, with why
            self.skip_reason = str(e)
            self.close()
            return
        self.skip_reason = reply.get("skip")
        info = reply.get("info") or {}
        self.baseline = info.get("baseline", self.baseline)
        self.lossless = info.get("lossless", self.lossless)
        if self.skip_reason:
            self.close()

    def run(self, prompt_ids, *, max_new_tokens, temperature, seed) -> RunOutput:
        if self.proc is None:  # the last worker died: start a fresh one
            self._start()
        reply = self._ask(
            {
                "op": "run",
                "prompt_ids": list(prompt_ids),
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "seed": seed,
            }
        )
        return RunOutput(**reply["out"])

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"op": "close"}) + "\n")
            proc.stdin.close()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# worker side


def _build(request: dict) -> Method:
    module, _, name = request["factory"].partition(":")
    factory = getattr(importlib.import_module(module), name)
    return factory(request["spec"], PeerModel(**request["model"]), threads=request["threads"])


def serve(requests: IO[str], replies: IO[str]) -> None:
    """Answer requests until `close` or the end of input."""
    method: Method | None = None

    def reply(**kw) -> None:
        replies.write(json.dumps({"ok": True, **kw}) + "\n")
        replies.flush()

    for line in requests:
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "prepare":
                method = _build(req)
                try:
                    method.prepare()
                except ImportError as e:
                    method.skip_reason = f"{type(e).__name__}: {e}"
                reply(skip=method.skip_reason, info=method.info())
            elif op == "run":
                if method is None:
                    raise VeridraftError("run before prepare")
                reset_ok = peak_rss_reset()
                out = method.run(
                    req["prompt_ids"],
                    max_new_tokens=req["max_new_tokens"],
                    temperature=req["temperature"],
                    seed=req["seed"],
                )
                out.peak_rss_mb = peak_rss_mb(reset_ok)
                reply(out=asdict(out))
            elif op == "close":
                return
            else:
                raise VeridraftError(f"unknown request {op!r}")
        except Exception as e:  # reported to the parent, which records the method's failure
            replies.write(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
            replies.flush()


def main() -> None:
    # Ctrl-C reaches the whole process group: the parent ends its workers itself (close).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Replies go to a private copy of stdout; whatever the native library prints goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()
