"""One generation at a time, requests served first come, first served.

A CPU runs one generation fastest on its own (batch 1; the cores are already busy with one
forward), so the engine is a single worker thread fed by a FIFO queue. The event loop never runs
model code: each job reports back through an asyncio queue (`Job.events`), so one request's text
can only reach its own queue. Cancelling a waiting job removes it from the queue at once;
cancelling the running job raises inside the streaming callback, so generation stops at the next
piece of text (the next verification round that produces text).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("veridraft.serve")


class Cancelled(Exception):
    """Raised inside the streaming callback of a job whose client went away."""


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class Job:
    """One request's generation. `work(on_text)` runs in the worker thread and returns the result;
    it must call `on_text(piece)` for each piece of text (that is where cancellation lands)."""

    work: Callable[[Callable[[str], None]], Any]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_piece: float | None = None
    piece_times: list[float] = field(default_factory=list)
    finished: float | None = None
    outcome: str = "waiting"  # waiting | running | done | error | abort
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


class Engine:
    """FIFO queue + one worker thread. `on_finish(job, result)` is called once per job that ran
    or was cancelled while waiting (result None unless it completed), e.g. to record metrics."""

    def __init__(
        self,
        max_queue: int = 64,
        on_finish: Callable[[Job, Any], None] | None = None,
        on_queue_change: Callable[[int, int], None] | None = None,
    ) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.max_queue = max_queue
        self._on_finish = on_finish
        self._on_queue_change = on_queue_change
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="veridraft-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return 1 if self._running is not None else 0

    def _changed(self) -> None:
        if self._on_queue_change is not None:
            self._on_queue_change(self.running, len(self._waiting))

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise ShuttingDown()
            # The slot being served does not count: max_queue is how many may wait.
            if len(self._waiting) >= self.max_queue and (
                self._running is not None or self._waiting
            ):
                raise QueueFull()
            self._waiting.append(job)
            self._changed()
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job: a waiting one leaves the queue now, a running one at its next piece."""
        job.cancelled.set()
        with self._cv:
            try:
                self._waiting.remove(job)
            except ValueError:
                return
            job.outcome = "abort"
            job.finished = time.perf_counter()
            self._changed()
        self._finish(job, None)
        job.emit("cancelled")

    def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, cancel the waiting ones, let the running one finish for up to
        `timeout` seconds, then cancel it too."""
        with self._cv:
            self._closed = True
            dropped = list(self._waiting)
            self._waiting.clear()
            self._changed()
            self._cv.notify_all()
        for job in dropped:
            job.cancelled.set()
            job.outcome = "abort"
            job.emit("error", ShuttingDown("the server is shutting down"))
        self._thread.join(timeout)
        running = self._running
        if running is not None:
            running.cancelled.set()
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running = job
                self._changed()
            try:
                self._run(job)
            finally:
                with self._cv:
                    self._running = None
                    self._changed()

    def _finish(self, job: Job, result: Any) -> None:
        if self._on_finish is not None:
            try:
                self._on_finish(job, result)
            except Exception:
                log.exception("recording metrics failed")

    def _run(self, job: Job) -> None:
        job.started = time.perf_counter()
        job.outcome = "running"

        def on_text(piece: str) -> None:
            if job.cancelled.is_set():
                raise Cancelled()
            now = time.perf_counter()
            if job.first_piece is None:
                job.first_piece = now
            job.piece_times.append(now)
            job.emit("text", piece)

        result, error = None, None
        try:
            if job.cancelled.is_set():
                raise Cancelled()
            result = job.work(on_text)
            job.outcome = "done"
        except Cancelled:
            job.outcome = "abort"
        except Exception as e:  # reported to the client; the engine keeps serving
            job.outcome, error = "error", e
            if not _is_user_error(e):
                log.exception("generation failed")
        job.finished = time.perf_counter()
        # Metrics first, so that a client that has its answer also finds it counted.
        self._finish(job, result)
        if job.outcome == "done":
            job.emit("done", result)
        elif job.outcome == "abort":
            job.emit("cancelled")
        else:
            job.emit("error", error)


def _is_user_error(e: Exception) -> bool:
    from ..errors import VeridraftError

    return isinstance(e, VeridraftError)
