"""Continuous batching: every admitted request advances one round per engine step.

One worker thread runs the loop: it admits queued requests into a `batch.Batcher` (up to
--max-num-seqs, within the KV budget), and each step prefills a chunk of the oldest newcomer and
runs one round of every running request in one target forward (in the row-invariant modes;
interleaved forwards otherwise). Each request's answer is bitwise its answer alone (batch.py).
The event loop never runs model code: each job reports back through an asyncio queue
(`Job.events`), so one request's text can only reach its own queue. Cancelling a waiting job
removes it from the queue at once; a running one leaves the batch before the next step.

A job without a batch request (`Job.work`: a generation the batch cannot take, such as a drafter
that reads the target's activations) runs alone, between batches, first come, first served.
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
class BatchWork:
    """A job's generations for the batch: `requests(on_piece)` makes its batch.Requests (one
    per choice, n > 1 gives several) whose text goes to on_piece(choice, piece, logprobs);
    `finish(results)` turns their (new ids, stats) into the job's result."""

    requests: Callable[[Callable[[int, str], None]], list]
    finish: Callable[[list], Any]


@dataclass
class Job:
    """One request's generation. `work(on_text)` runs in the worker thread and returns the result;
    it must call `on_text(piece)` for each piece of text (that is where cancellation lands)."""

    work: Callable[[Callable[[str], None]], Any] | None
    loop: asyncio.AbstractEventLoop
    batch: BatchWork | None = None
    entries: list = field(default_factory=list)  # its batch.Entry per choice, once admitted
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_piece: float | None = None
    piece_times: list[float] = field(default_factory=list)
    finished: float | None = None
    outcome: str = "waiting"  # waiting | running | done | error | abort
    cancelled: threading.Event = field(default_factory=threading.Event)
    # cancelled by the server's shutdown, not by its client: the client is still there and is
    # told its answer was cut (the last event is ("cancelled", "shutdown"))
    cut_by_shutdown: bool = False

    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


def in_passing_thread(fn: Callable[[], Any]) -> Any:
    """fn() on a thread of its own that ends with it; its result or its exception.

    For the server's start (loading the model, the warm-up generation): every thread that runs
    a parallel torch operation becomes the master of an OpenMP team whose workers outlive the
    operation, and once a process holds more such threads than cores, GNU OpenMP lets its
    workers spin only briefly before sleeping, so every parallel region pays a wake-up. The
    engine thread runs hundreds of regions per forward: with the main thread's team alive
    beside it, a smollm2-135m step on 2 cores took 9.4 ms instead of 3.0 (AMD EPYC Zen 5,
    2 threads). A thread that ends frees its team, leaving the engine's the only one."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            out["error"] = e

    # a daemon: Ctrl-C during a long load interrupts join() and the process exits, load or not
    t = threading.Thread(target=run, name="veridraft-start", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class Engine:
    """The queue and the worker thread. `on_finish(job, result)` is called once per job that ran
    or was cancelled (result None unless it completed), e.g. to record metrics.

    batcher: a batch.Batcher for jobs with `batch` work (None: only `work` jobs, one at a time).
    max_queue: jobs that may wait (not yet admitted to the batch) before submit answers
    QueueFull."""

    def __init__(
        self,
        max_queue: int = 64,
        on_finish: Callable[[Job, Any], None] | None = None,
        on_queue_change: Callable[[int, int], None] | None = None,
        batcher=None,
    ) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.max_queue = max_queue
        self.batcher = batcher
        self._on_finish = on_finish
        self._on_queue_change = on_queue_change
        self._waiting: collections.deque[Job] = collections.deque()
        self._batched: list[Job] = []  # jobs handed to the batcher
        self._cv = threading.Condition()
        self._running: Job | None = None  # a `work` job running alone
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="veridraft-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting) + sum(1 for j in self._batched if not _admitted(j))

    @property
    def running(self) -> int:
        return (self._running is not None) + sum(1 for j in self._batched if _admitted(j))

    def kv_usage(self) -> float:
        """The fraction of the batch's KV budget held by admitted requests."""
        return self.batcher.usage() if self.batcher is not None else 0.0

    def busy(self) -> dict[str, float]:
        """Seconds the batch loop has spent in prompt chunks and in decoding rounds."""
        b = self.batcher
        return dict(b.busy_s) if b is not None else {"prefill": 0.0, "decode": 0.0}

    def _changed(self) -> None:
        if self._on_queue_change is not None:
            self._on_queue_change(self.running, self.waiting)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise ShuttingDown()
            if job.batch is not None and self.batcher is None:
                raise ValueError("this engine has no batcher for batch work")
            # The requests being served do not count: max_queue is how many may wait.
            if self.waiting >= self.max_queue and (self.running or self.waiting):
                raise QueueFull()
            self._waiting.append(job)
            self._changed()
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job: a waiting one leaves the queue now, a running one before the next step
        (a `work` job at its next piece)."""
        job.cancelled.set()
        with self._cv:
            try:
                self._waiting.remove(job)
            except ValueError:
                self._cv.notify()  # a batched job leaves at the top of the next step
                return
            job.outcome = "abort"
            self._changed()
        self._close(job, None, None)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, answer the waiting ones with an error, let the running ones finish
        for up to `timeout` seconds, then cancel them too."""
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
        with self._cv:
            for job in [self._running, *self._batched]:
                if job is not None:
                    job.cut_by_shutdown = True
                    job.cancelled.set()
            self._cv.notify_all()
        self._thread.join(timeout)

    # ---- the worker thread ----

    def _loop(self) -> None:
        while True:
            solo = None
            with self._cv:
                while not self._waiting and not self._batched and not self._closed:
                    self._cv.wait()
                if self._closed and not self._batched:
                    return
                while self._waiting:  # in order: a `work` job waits for the batch to drain
                    job = self._waiting[0]
                    if job.batch is None:
                        if not self._batched:
                            solo = self._running = self._waiting.popleft()
                        break
                    self._waiting.popleft()
                    self._batched.append(job)
                    self._enter(job)
                self._changed()
            if solo is not None:
                try:
                    self._run(solo)
                finally:
                    with self._cv:
                        self._running = None
                        self._changed()
                continue
            if self._closed:
                self._drop_unadmitted()
            self._step()

    def _enter(self, job: Job) -> None:
        """Hand a job's requests to the batcher (a request it refuses ends the job)."""

        def on_piece(choice: int, piece: str, logprobs=None) -> None:
            if job.cancelled.is_set():
                raise Cancelled()
            now = time.perf_counter()
            if job.first_piece is None:
                job.first_piece = now
            job.piece_times.append(now)
            job.emit("text", (choice, piece, logprobs))

        try:
            for req in job.batch.requests(on_piece):
                job.entries.append(self.batcher.add(req))
        except Exception as e:
            self._end(job, None, e)

    def _drop_unadmitted(self) -> None:
        """At shutdown: jobs the batch has not admitted yet get an error now."""
        for job in list(self._batched):
            if not _admitted(job):
                self._end(job, None, ShuttingDown("the server is shutting down"))

    def _step(self) -> None:
        b = self.batcher
        for job in list(self._batched):  # cancelled jobs leave before the step
            if job.cancelled.is_set():
                self._end(job, None, Cancelled())
        if not self._batched:
            return
        try:
            b.step()
        except Exception as e:  # the batch itself failed: every request in it gets the error
            log.exception("batch step failed")
            for job in list(self._batched):
                self._end(job, None, e)
            return
        for job in list(self._batched):
            if job.started is None and _admitted(job):
                job.started = min(e.t_admitted for e in job.entries if e.t_admitted)
                job.outcome = "running"
            err = next((e.error for e in job.entries if e.error is not None), None)
            if err is not None:
                self._end(job, None, err)
            elif job.entries and all(e.state == "done" for e in job.entries):
                try:
                    result = job.batch.finish([e.result for e in job.entries])
                except Exception as e:
                    self._end(job, None, e)
                else:
                    self._end(job, result, None)
        with self._cv:
            self._changed()

    def _end(self, job: Job, result: Any, error: BaseException | None) -> None:
        for e in job.entries:
            if e.state not in ("done", "error", "cancelled"):
                self.batcher.cancel(e)
        if job in self._batched:
            self._batched.remove(job)
        if isinstance(error, Cancelled) or (error is not None and job.cancelled.is_set()):
            job.outcome, error = "abort", None
        elif error is not None:
            job.outcome = "error"
            if not _is_user_error(error) and not isinstance(error, ShuttingDown):
                log.error("generation failed: %s: %s", type(error).__name__, error)
        else:
            job.outcome = "done"
        self._close(job, result, error)

    def _close(self, job: Job, result: Any, error: BaseException | None) -> None:
        """The end of every job, batched or not: metrics first, so that a client that has its
        answer also finds it counted, then the job's last event."""
        job.finished = time.perf_counter()
        if self._on_finish is not None:
            try:
                self._on_finish(job, result)
            except Exception:
                log.exception("recording metrics failed")
        if job.outcome == "done":
            job.emit("done", result)
        elif job.outcome == "abort":
            job.emit("cancelled", "shutdown" if job.cut_by_shutdown else None)
        else:
            job.emit("error", error)

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
        self._close(job, result, error)


def _admitted(job: Job) -> bool:
    return any(e.state != "waiting" for e in job.entries)


def _is_user_error(e: Exception) -> bool:
    from ..errors import VeridraftError

    return isinstance(e, VeridraftError)
