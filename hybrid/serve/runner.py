"""One engine, one worker thread: chat jobs run one at a time, in the order they were submitted.

Owns the FIFO queue (queue positions logged, Retry-After estimated from the queue and the measured job
time), handing each job's events from the worker thread to its asyncio consumer with exactly one ending,
stopping a generation between tokens once its job is cancelled (the client left), and shutdown (every job
in line ends at once with a 503 Failed). Must not: know HTTP or any wire format, or touch the model other
than through engine.generate.
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
from typing import Any, AsyncIterator, Callable, Iterator

from hybrid.text.conversation import Done, run_chat
from hybrid.text.parser import Event
from hybrid.model.sampling import SamplingParams
from hybrid.serve.limits import DEFAULT_KEEPALIVE_S, DEFAULT_MAX_QUEUE


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
    """The job ended without an answer: status and code say why, as HTTP would (500: generation failed;
    503: the server is shutting down)."""
    message: str
    status: int = 500
    code: str = "server_error"


_END = object()  # the last item of every job


def _shutting_down(job: Job) -> Failed:
    """The 503 a job gets when the server shuts down before its answer is complete."""
    why = "the answer was cut short" if job.begun else "the request was not started; retry later"
    return Failed(f"the server is shutting down: {why}", 503, "shutting_down")


RETRY_AFTER_DEFAULT_S = 2  # before any request has finished, the seconds a job is assumed to take
RETRY_AFTER_MAX_S = 60  # clients honour a Retry-After up to about this (the OpenAI and Anthropic SDKs: 60)


class QueueFull(Exception):
    """The runner already holds max_queue waiting jobs; retry_after_s estimates when there will be room."""

    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"{waiting} requests are already waiting for the model")
        self.waiting, self.retry_after_s = waiting, retry_after_s


class ShuttingDown(Exception):
    """The runner takes no more jobs: the server is stopping."""


@dataclass(eq=False)
class Job:
    """One chat request for the worker: a tokenized prompt, sampling, and the tools the parser accepts.
    Its items go to one asyncio consumer, the last (Finished or Failed) once, from either side."""
    prompt: list[int]
    params: SamplingParams
    tool_names: list[str] | None
    max_tokens: int
    forced: str = ""  # the assistant turn's forced start (tool_choice), already at the end of prompt
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    begun: bool = False  # the worker took it (it may have been cut short since)
    _loop: asyncio.AbstractEventLoop | None = None
    _out: asyncio.Queue | None = None
    _ready: asyncio.Event | None = None  # set with the first item delivered
    _first: object = None
    _closed: bool = False  # the last item was handed over
    _ended: bool = False  # and the end of the items
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, item: object) -> None:
        """Hand an item to the consumer (from any thread); nothing passes once the job's last item did."""
        with self._lock:
            if not self._closed:
                self._send(item)

    def finish(self, last: object) -> bool:
        """Hand over the job's last item (Finished or Failed), unless it already has one: the worker's
        answer and the server's shutdown may race, and the consumer must see exactly one. The end of the
        items follows with end()."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._send(last)
            return True

    def end(self, last: object | None = None) -> None:
        """finish(last) when given, then the end of the items (once): the consumer stops reading."""
        with self._lock:
            if last is not None and not self._closed:
                self._closed = True
                self._send(last)
            if not self._ended:
                self._closed = self._ended = True
                self._send(_END)

    def _send(self, item: object) -> None:
        try:  # through the loop even from its own thread, so items already in flight stay in order
            self._loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()

    def _deliver(self, item: object) -> None:  # on the event loop
        if not self._ready.is_set():
            self._first = item
            self._ready.set()
        self._out.put_nowait(item)

    async def opening(self) -> Failed | None:
        """Wait for the first item; the Failed the job ended with if nothing came before it (it never
        started: the server is shutting down, or its prefill failed), else None."""
        await self._ready.wait()
        return self._first if isinstance(self._first, Failed) else None


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
    max_queue: how many jobs may wait behind the running one (None: no limit); submit() refuses more.
    clock: seconds (monotonic), for the measured job time behind Retry-After."""

    def __init__(self, engine: Any, max_queue: int | None = None, clock: Callable[[], float] = time.monotonic):
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 or None, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self._clock = clock
        self._job_s: float | None = None  # moving average of how long a job holds the worker
        self._promised: list[float] = []  # when the clients refused lately were told to come back
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.active: Job | None = None
        self.served = self.cancelled = 0
        self._stopping = False
        self._lock = threading.Lock()
        self._in_line = 0  # submitted and not yet finished, the running job included
        self._live: set[Job] = set()  # the same jobs: whom a shutdown must answer

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

    def shutdown(self) -> None:
        """Take no more jobs, and end every one in line now (from the event loop's thread): the running
        one stops at its next token, and each consumer gets a 503 Failed at once instead of waiting."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
            live = list(self._live)
        for job in live:
            job.cancel()
            job.end(_shutting_down(job))
        if first:
            log.info("shutting down: %d request(s) ended, %s", len(live), "none running" if self.active is None
                     else f"request {self.active.id} stops at its next token")
            self._jobs.put(None)  # the worker ends after the token it is computing

    def stop(self, timeout: float = 30.0) -> None:
        """shutdown(), then wait (up to timeout) for the worker to finish its current token and end."""
        if self._thread is None:
            return
        self.shutdown()
        self._thread.join(timeout)
        self._thread = None

    def submit(self, job: Job) -> Job:
        """Queue a job (from the event loop); its items arrive through events(job)."""
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            ahead = self._in_line  # submitted and not finished: one of them runs (or is about to)
            if self.max_queue is not None and (waiting := self._behind_running()) >= self.max_queue:
                wait = self._wait_s(waiting)
                self._promised.append(self._clock() + wait)
                raise QueueFull(waiting, wait)
            self._in_line += 1
            self._live.add(job)
        job._loop, job._out, job._ready = asyncio.get_running_loop(), asyncio.Queue(), asyncio.Event()
        log.info("request %s: %d prompt tokens, queue position %d (%s)", job.id, len(job.prompt), ahead + 1,
                 "starts now" if ahead == 0 else f"{ahead} ahead")
        self._jobs.put(job)
        return job

    def retry_after_s(self) -> int:
        """What a client refused now would be told to wait, in whole seconds (see _wait_s)."""
        with self._lock:
            return self._wait_s(self.waiting)

    def _wait_s(self, waiting: int) -> int:
        """When a refused client will find room: once the jobs waiting have run (at the measured seconds
        per job), plus a queue's worth of jobs for each full group of clients refused before it that are
        still due back, so a burst returns spread out in groups the queue can take. Hold self._lock."""
        now = self._clock()
        self._promised = [t for t in self._promised if t > now]
        job_s = RETRY_AFTER_DEFAULT_S if self._job_s is None else self._job_s
        room = (self.max_queue or 0) + 1  # max_queue waiting, and one starting
        jobs = max(1, waiting) + len(self._promised) // room * room
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(job_s * jobs)))

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
            self.active, job.begun = job, True
            t0 = self._clock()
            try:
                self._run(job)
            except ConnectionError as exc:  # a cluster node lost (hybrid.cluster): the head goes on without it
                log.error("request %s failed: %s", job.id, exc)
                job.finish(Failed(f"an expert node was lost: {exc}", 503, "node_lost"))
            except Exception as exc:  # a request must never take the worker down
                log.exception("request %s failed", job.id)
                job.finish(Failed(f"generation failed: {type(exc).__name__}: {exc}"))
            finally:
                dt = self._clock() - t0
                self._job_s = dt if self._job_s is None else 0.7 * self._job_s + 0.3 * dt
                self.active = None
                self._done(job)
        while not self._jobs.empty():  # stopping: tell whoever still waits
            if (job := self._jobs.get()) is not None:
                self._done(job)

    def _done(self, job: Job) -> None:
        """The job leaves the line. While stopping, one without an answer yet ends with shutdown()'s 503:
        the worker may reach a job (skip it in line, stop it at its next token) before shutdown() does, and
        its consumer must still be told why."""
        with self._lock:
            self._in_line -= 1
            self._live.discard(job)
            stopping = self._stopping
        job.finished.set()
        job.end(_shutting_down(job) if stopping else None)

    def _run(self, job: Job) -> None:
        tokens: list[int] = []
        answered = False
        chat = run_chat(_Cancellable(self.engine, job, tokens), job.prompt, job.params, job.tool_names, job.max_tokens,
                        job.forced)
        try:
            for item in chat:
                if job.cancelled.is_set():
                    break
                if not isinstance(item, Done):
                    job.emit(item)
                    continue
                answered = job.finish(Finished(item, self._stop_sequence(job, item, tokens)))  # False: a shutdown did
                if answered:
                    self.served += 1
                    log.info("request %s: %s after %d tokens (%d reasoning); prefilled %d of %d prompt tokens "
                             "in %.2f s; %.1f tokens/s", job.id, item.finish_reason, item.completion_tokens,
                             item.reasoning_tokens, item.prefill_tokens, item.prompt_tokens,
                             item.prefill_s, item.completion_tokens / max(item.decode_s, 1e-9))
        finally:
            chat.close()
        if job.cancelled.is_set() and not answered:
            self.cancelled += 1
            why = "the server is shutting down" if self._stopping else "the client left"
            log.info("request %s: %s; stopped after %d tokens", job.id, why, len(tokens))

    def _stop_sequence(self, job: Job, done: Done, tokens: list[int]) -> str | None:
        """Which stop string ended the answer (run_chat only says 'stop')."""
        tok = self.engine.tokenizer
        if done.finish_reason != "stop" or not job.params.stop or not tokens or tokens[-1] in tok.stop_ids:
            return None
        text = tok.decode(tokens)
        hits = [(i, s) for s in job.params.stop if (i := text.find(s)) >= 0]
        return min(hits)[1] if hits else None
