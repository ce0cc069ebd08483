"""One engine, one worker thread: chat jobs run one at a time, in the order they were submitted.

Owns the FIFO queue (queue positions logged), handing each job's events from the worker thread to its
asyncio consumer, and stopping a generation between tokens once its job is cancelled (the client left).
Must not: know HTTP or any wire format, or touch the model other than through engine.generate.
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from hybrid.text.conversation import Done, run_chat
from hybrid.text.parser import Event
from hybrid.model.sampling import SamplingParams

DEFAULT_MAX_QUEUE = 16  # requests waiting behind the running one; more get a 429 with Retry-After
DEFAULT_KEEPALIVE_S = 10.0  # a streamed answer with nothing to send for this long gets an SSE comment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Started:
    """The prompt is in the KV cache; prefill_tokens of it were computed (the rest was reused)."""
    prefill_tokens: int


@dataclass(frozen=True)
class Finished:
    done: Done
    stop_sequence: str | None  # the stop string that ended the answer, if one did


@dataclass(frozen=True)
class Failed:
    message: str


_END = object()  # the last item of every job
RETRY_AFTER_DEFAULT_S = 2  # before any request has finished, what a refused client is told to wait
RETRY_AFTER_MAX_S = 60  # clients honour a Retry-After up to about this


class QueueFull(Exception):
    """The runner already holds max_queue waiting jobs; retry_after_s estimates when one will have started."""

    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"{waiting} requests are already waiting for the model")
        self.waiting, self.retry_after_s = waiting, retry_after_s


@dataclass(eq=False)
class Job:
    """One chat request for the worker: a tokenized prompt, sampling, and the tools the parser accepts."""
    prompt: list[int]
    params: SamplingParams
    tool_names: list[str] | None
    max_tokens: int
    forced: str = ""  # the assistant turn's forced start (tool_choice), already at the end of prompt
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _out: asyncio.Queue | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, item: object) -> None:  # from the worker thread
        try:
            self._loop.call_soon_threadsafe(self._out.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()


class _Cancellable:
    """The engine as run_chat sees it, but its token stream ends between tokens once the job is
    cancelled, and it reports when the prompt is in the cache."""

    def __init__(self, engine: Any, job: Job, tokens: list[int]):
        self.engine, self.job, self.tokens = engine, job, tokens
        self.tokenizer = engine.tokenizer

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        steps = self.engine.generate(*args, should_stop=self.job.cancelled.is_set, **kwargs)  # also mid-prefill
        try:
            for step in steps:
                if step.index == 0:
                    self.job.emit(Started(step.prefill_tokens))
                self.tokens.append(step.token)
                yield step
                if self.job.cancelled.is_set():
                    return
        finally:
            steps.close()  # the engine trims its KV bookkeeping to what was computed


class EngineRunner:
    """One worker thread runs jobs one at a time, in the order they were submitted.
    max_queue: how many jobs may wait behind the running one (None: no limit); submit() refuses more."""

    def __init__(self, engine: Any, max_queue: int | None = None):
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 or None, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self._job_s: float | None = None  # moving average of how long a job holds the worker
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.active: Job | None = None
        self.served = self.cancelled = 0
        self._stopping = False
        self._lock = threading.Lock()
        self._in_line = 0  # submitted and not yet finished, the running job included

    @property
    def waiting(self) -> int:
        """Jobs behind the running one whose client is still there: what max_queue bounds and /health
        reports. Counted from the jobs in line, not the queue: a burst at an idle worker must not count
        the job about to start; a client that left stays queued until the worker skips it, uncounted."""
        return max(0, self._behind_running())

    def _behind_running(self) -> int:
        """Live jobs in line minus the one that runs or is about to: -1 when the line is empty."""
        with self._jobs.mutex:
            gone = sum(1 for j in self._jobs.queue if j is not None and j.cancelled.is_set())
        return self._in_line - gone - 1

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="kimi-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what runs and what waits, then end the worker."""
        if self._thread is None:
            return
        self._stopping = True
        if self.active is not None:
            self.active.cancel()
        self._jobs.put(None)
        self._thread.join(timeout)
        self._thread = None

    def submit(self, job: Job) -> Job:
        """Queue a job (from the event loop); its items arrive through events(job)."""
        with self._lock:
            ahead = self._in_line  # submitted and not finished: one of them runs (or is about to)
            if self.max_queue is not None and (waiting := self._behind_running()) >= self.max_queue:
                raise QueueFull(waiting, self.retry_after_s())
            self._in_line += 1
        job._loop, job._out = asyncio.get_running_loop(), asyncio.Queue()
        log.info("request %s: %d prompt tokens, queue position %d (%s)", job.id, len(job.prompt), ahead + 1,
                 "starts now" if ahead == 0 else f"{ahead} ahead")
        self._jobs.put(job)
        return job

    def retry_after_s(self) -> int:
        """Seconds until the running job is likely done (its average so far), as whole seconds for Retry-After."""
        est = RETRY_AFTER_DEFAULT_S if self._job_s is None else self._job_s
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(est)))

    async def events(self, job: Job) -> AsyncIterator[Event | Started | Finished | Failed]:
        """The job's events, Started, then Finished or Failed. Leaving early (the client went away)
        cancels the job: it stops at the next token, or never starts."""
        try:
            while (item := await job._out.get()) is not _END:
                yield item
        finally:
            if not job.finished.is_set():
                job.cancel()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set() or self._stopping:
                log.info("request %s: cancelled while queued", job.id)
                self.cancelled += 1
                self._done(job)
                continue
            self.active = job
            t0 = time.perf_counter()
            try:
                self._run(job)
            except Exception as exc:  # a request must never take the worker down
                log.exception("request %s failed", job.id)
                job.emit(Failed(f"generation failed: {type(exc).__name__}: {exc}"))
            finally:
                dt = time.perf_counter() - t0
                self._job_s = dt if self._job_s is None else 0.7 * self._job_s + 0.3 * dt
                self.active = None
                self._done(job)
        while not self._jobs.empty():  # stopping: tell whoever still waits
            if (job := self._jobs.get()) is not None:
                job.emit(_END)

    def _done(self, job: Job) -> None:
        with self._lock:
            self._in_line -= 1
        job.finished.set()
        job.emit(_END)

    def _run(self, job: Job) -> None:
        tokens: list[int] = []
        answered = False
        chat = run_chat(_Cancellable(self.engine, job, tokens), job.prompt, job.params, job.tool_names, job.max_tokens,
                        job.forced)
        try:
            for item in chat:
                if job.cancelled.is_set():
                    break
                if isinstance(item, Done):
                    item = Finished(item, self._stop_sequence(job, item, tokens))
                    answered = True
                    self.served += 1
                    log.info("request %s: %s after %d tokens (%d reasoning); prefilled %d of %d prompt tokens "
                             "in %.2f s; %.1f tokens/s", job.id, item.done.finish_reason, item.done.completion_tokens,
                             item.done.reasoning_tokens, item.done.prefill_tokens, item.done.prompt_tokens,
                             item.done.prefill_s, item.done.completion_tokens / max(item.done.decode_s, 1e-9))
                job.emit(item)
        finally:
            chat.close()
        if job.cancelled.is_set() and not answered:
            self.cancelled += 1
            log.info("request %s: the client left; stopped after %d tokens", job.id, len(tokens))

    def _stop_sequence(self, job: Job, done: Done, tokens: list[int]) -> str | None:
        """Which stop string ended the answer (run_chat only says 'stop')."""
        tok = self.engine.tokenizer
        if done.finish_reason != "stop" or not job.params.stop or not tokens or tokens[-1] in tok.stop_ids:
            return None
        text = tok.decode(tokens)
        hits = [(i, s) for s in job.params.stop if (i := text.find(s)) >= 0]
        return min(hits)[1] if hits else None
