"""A peer for the worker tests: answers with fixed ids, or kills its own process with SIGILL
(as a llama.cpp build for another CPU does) when the prompt starts with CRASH."""

from __future__ import annotations

import os
import resource
import signal

from veridraft.bench.base import Method, RunOutput

CRASH = 666


class FakePeer(Method):
    engine = "fake"

    def __init__(self, spec: str, model, threads: int = 2) -> None:
        super().__init__(spec)
        self.model = model
        self.baseline = spec

    def run(self, prompt_ids, *, max_new_tokens, temperature, seed) -> RunOutput:
        if prompt_ids and prompt_ids[0] == CRASH:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
            os.kill(os.getpid(), signal.SIGILL)
        ids = [(seed + i) % 50 for i in range(max_new_tokens)]
        return RunOutput(ids=ids, wall_s=0.01, prefill_s=0.001, finish_reason="length")


def make(spec: str, model, threads: int = 2) -> Method:
    return FakePeer(spec, model, threads=threads)
