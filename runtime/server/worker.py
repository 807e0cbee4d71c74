"""The one thread that owns the Pipeline: it loads it, then runs queued generations one at a time
(`Worker`), or up to --parallel of them together (`BatchWorker`, over runtime/scheduler.py).

The pipeline is not thread-safe, so every generation runs on this thread. Requests are admitted into
a bounded queue (`max_queue` waiting + the one running); each Job carries an asyncio queue that the
thread feeds with GenerationChunks, then an exception if the generation failed, then DONE. A job whose
`cancelled` flag is set (client gone, request timed out) is skipped if it has not started, or has its
generator closed after the decode step in progress.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError, MiniCPMOError
from ..types import GenerationParams, Message

log = logging.getLogger(__name__)
DONE = object()  # the last event of every job


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("the request queue is full")
        self.retry_after = retry_after


class NotReady(Exception):
    """The model has not loaded (yet, or ever)."""


@dataclass(eq=False)
class Job:
    request_id: str
    messages: list[Message]
    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    speech: Any = None  # runtime.speech.SpeechRequest: speak the reply too

    def emit(self, item: Any) -> None:
        """Hand one event to the request's event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()


class Worker:
    """Loads the pipeline in the background, then serves Jobs in arrival order."""

    def __init__(self, factory: Callable[[], Any], max_queue: int):
        self._factory = factory
        self.max_queue = max_queue
        self.pipeline: Any = None
        self.state = "loading"  # -> "ready" | "failed"
        self.load_error: str | None = None
        self.on_load_failed: list[Callable[[str], None]] = []
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0  # waiting + running
        self._running = 0
        self._mean_seconds = 2.0  # moving average of one job's run time, for Retry-After
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- event-loop side -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread (again, after stop(): the pipeline is loaded only once)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="minicpmo-generate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is queued or running and end the thread (waits at most `timeout`)."""
        self._stopping.set()
        self._jobs.put(None)
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._admitted - self._running

    @property
    def running(self) -> int:
        return self._running

    def full(self) -> bool:
        with self._lock:
            return self._admitted >= self.max_queue + 1

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about the time to drain the queue, within 1..600."""
        with self._lock:
            estimate = self._mean_seconds * max(self._admitted, 1)
        return int(min(max(math.ceil(estimate), 1), 600))

    def submit(self, job: Job) -> None:
        """Queue a job, or raise NotReady / QueueFull."""
        if self.state != "ready":
            raise NotReady(self.load_error or "the model is still loading")
        with self._lock:
            full = self._admitted >= self.max_queue + 1
            if not full:
                self._admitted += 1
        if full:
            raise QueueFull(self.retry_after())
        self._jobs.put(job)

    # -- worker thread -------------------------------------------------------------------------
    def _run(self) -> None:
        if self.pipeline is None and not self._load():
            return
        while (job := self._jobs.get()) is not None:
            try:
                self._execute(job)
            finally:
                with self._lock:
                    self._admitted -= 1
                    self._running = 0
        while not self._jobs.empty():  # stopped: release whatever is still queued
            if (job := self._jobs.get_nowait()) is not None:
                job.emit(DONE)

    def _load(self) -> bool:
        t0 = time.perf_counter()
        try:
            self.pipeline = self._factory()
        except Exception as e:  # any load failure is reported by /health and the serve command
            self.load_error = f"the model failed to load: {e}"
            self.state = "failed"
            log.error("%s", self.load_error, exc_info=not isinstance(e, MiniCPMOError | OSError))  # ours: one line
            for callback in self.on_load_failed:
                callback(self.load_error)
            return False
        self.state = "ready"
        log.info("model %s loaded in %.1f s", getattr(self.pipeline, "model_name", "?"), time.perf_counter() - t0)
        return True

    def _execute(self, job: Job) -> None:
        if job.cancelled.is_set() or self._stopping.is_set():
            job.emit(DONE)
            return
        with self._lock:
            self._running = 1
        job.started_at = time.monotonic()
        gen = None
        try:
            gen = (self.pipeline.generate(job.messages, job.params) if job.speech is None
                   else self.pipeline.generate(job.messages, job.params, job.speech))
            for chunk in gen:
                job.emit(chunk)
                # checked between steps, so a cancelled job stops within one decode step
                if job.cancelled.is_set() or self._stopping.is_set():
                    break
        except InputError as e:
            job.emit(e)
        except Exception as e:  # a failing request must not take the worker (or other requests) down
            log.error("request %s: generation failed", job.request_id, exc_info=e)
            job.emit(e)
        finally:
            self._close(gen, job)
            job.emit(DONE)
            self._record_duration(time.monotonic() - job.started_at)

    @staticmethod
    def _close(gen, job: Job) -> None:
        if gen is None:
            return
        try:
            gen.close()
        except Exception as e:  # a generator that fails while closing still frees the worker
            log.error("request %s: closing the generation failed", job.request_id, exc_info=e)

    def _record_duration(self, seconds: float) -> None:
        with self._lock:
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds


class BatchWorker(Worker):
    """The worker for a pipeline loaded with parallel > 1: up to that many jobs generate together
    (runtime/scheduler.py), joining and leaving between decode steps."""

    def __init__(self, factory: Callable[[], Any], max_queue: int, parallel: int):
        super().__init__(factory, max_queue)
        self.parallel = parallel

    def full(self) -> bool:
        with self._lock:
            return self._admitted >= self.max_queue + self.parallel

    def submit(self, job: Job) -> None:
        if self.state != "ready":
            raise NotReady(self.load_error or "the model is still loading")
        with self._lock:
            full = self._admitted >= self.max_queue + self.parallel
            if not full:
                self._admitted += 1
        if full:
            raise QueueFull(self.retry_after())
        self._jobs.put(job)

    def retry_after(self) -> int:
        with self._lock:
            estimate = self._mean_seconds * max(self._admitted - self.parallel + 1, 1)
        return int(min(max(math.ceil(estimate), 1), 600))

    def _run(self) -> None:
        from ..scheduler import Scheduler

        if self.pipeline is None and not self._load():
            return
        scheduler = Scheduler(self.pipeline)
        try:
            while not self._stopping.is_set():
                if not self._take_jobs(scheduler, block=not scheduler.busy):
                    break
                if scheduler.busy:
                    self._step(scheduler)
        finally:
            scheduler.cancel_all()
            while not self._jobs.empty():  # stopped: release whatever is still queued
                if (job := self._jobs.get_nowait()) is not None:
                    self._finish(job)

    @staticmethod
    def _step(scheduler) -> None:
        try:
            scheduler.step()
        except Exception as e:  # a failing step ends the requests in it, not the server
            log.error("a batched decode step failed", exc_info=e)
            for reply in scheduler.replies:
                if reply is not None:
                    reply.request.fail(e)
            scheduler.cancel_all()

    def _take_jobs(self, scheduler, block: bool) -> bool:
        """Move queued jobs to the scheduler (waiting for one when idle); False once stopped."""
        while True:
            try:
                job = self._jobs.get(block=block)
            except queue.Empty:
                return True
            if job is None:
                return False
            if job.speech is not None:
                self._speak_alone(scheduler, job)
                continue
            scheduler.submit(self._request(job))
            block = False

    def _speak_alone(self, scheduler, job: Job) -> None:
        """A spoken reply runs on its own, after the batch in flight has finished: the speech path
        (runtime/speech.py) decodes one sequence, and its LLM part reads the final hidden state at
        <|spk|>, which the batched decode step does not return. Queued requests wait for it."""
        while scheduler.busy and not self._stopping.is_set():
            self._step(scheduler)
        self._execute(job)  # emits DONE
        with self._lock:
            self._running = 0
            self._admitted -= 1

    def _request(self, job: Job):
        from ..scheduler import BatchRequest

        def start() -> None:
            job.started_at = time.monotonic()
            with self._lock:
                self._running += 1

        def fail(e: Exception) -> None:
            if not isinstance(e, InputError):
                log.error("request %s: generation failed", job.request_id, exc_info=not isinstance(e, MiniCPMOError))
            job.emit(e)

        def close() -> None:
            if job.started_at is not None:
                with self._lock:
                    self._running -= 1
                self._record_duration(time.monotonic() - job.started_at)
            self._finish(job)

        return BatchRequest(job.messages, job.params, emit=job.emit, fail=fail, close=close, start=start,
                            cancelled=lambda: job.cancelled.is_set() or self._stopping.is_set())

    def _finish(self, job: Job) -> None:
        job.emit(DONE)
        with self._lock:
            self._admitted -= 1
