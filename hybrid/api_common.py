"""What the HTTP APIs share: one engine driven by one worker thread, requests in arrival order.

Owns the FIFO job queue (queue positions logged), stopping a generation between tokens once its client
has gone, reading request bodies under a size limit, API errors, and turning chat messages into a
prompt within the limits. Must not: know either wire format (api_openai.py, api_anthropic.py), or
touch the model or KV cache other than through the engine's generate / apply_chat_template.
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .chat import ChatTemplateError
from .conversation import Done, run_chat
from .parser import Event
from .sampling import SamplingError, SamplingParams
from .tokenizer import TokenizerError

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 100


class ApiError(Exception):
    """An invalid request: HTTP status, a message naming the problem, and the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class ServerState:
    engine: Any  # hybrid.Engine, or anything with its tokenizer / context / generate / apply_chat_template
    runner: EngineRunner
    model_name: str
    max_body_bytes: int
    max_prompt_tokens: int | None


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {state.model_name!r}",
                       "model", "model_not_found")


# ---- request bodies ----------------------------------------------------------------------------

async def read_json(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object, refusing more than max_bytes before reading all of it."""
    too_big = ApiError(413, f"the request body is larger than this server's limit of {max_bytes} bytes "
                            "(max_body_bytes)", None, "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_big
    if not body.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", None, "invalid_json")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise ApiError(400, f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}", None, "invalid_json")
    if _depth(data) > MAX_JSON_DEPTH:  # the template and tokenizer walk it recursively
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json")
    return data


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|dict|list|literal|tagged-union)\b|[\[\-]")


def _param(loc: tuple) -> str:
    """pydantic's error location as a field path: ('messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.search(str(part)):  # drop union-member tags such as 'str' or 'list[...]'
            out += f".{part}" if out else str(part)
    return out


def validate(model: type[BaseModel], data: dict) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = max(exc.errors(), key=lambda e: len(e["loc"]))  # the deepest is the most specific
        param = _param(tuple(err["loc"]))
        where = f"{param}: " if param else ""
        raise ApiError(400, f"{where}{err['msg']}", param or None, "invalid_request") from None


def sampling_params(fields: dict[str, str], **values: Any) -> SamplingParams:
    """SamplingParams from the request; a bad value is a 400 naming the request's field.
    fields: engine name -> the API's name for it (e.g. 'stop' -> 'stop_sequences')."""
    values = {k: v for k, v in values.items() if v is not None}
    try:
        return SamplingParams(**values)
    except SamplingError as exc:
        m = re.search(r"SamplingParams\.(\w+)", str(exc))
        name = fields.get(m.group(1), m.group(1)) if m else None
        message = re.sub(r"SamplingParams\.\w+", name or "a sampling parameter", str(exc))
        raise ApiError(400, message, name, "invalid_value") from None


def normalize_tool_ids(messages: list[dict]) -> list[dict]:
    """Rewrite tool-call ids that are not the model's own `functions.NAME:IDX` (ids from another model
    or client) into that form, in the calls and in the tool results that answer them; the template
    renders ids verbatim and K2 was trained on its own format."""
    own = re.compile(r"functions\.[^\s:]+:\d+")
    renamed: dict[str, str] = {}
    n = 0
    for m in messages:
        for call in m.get("tool_calls") or []:
            if not own.fullmatch(call["id"]):
                renamed[call["id"]] = f"functions.{call['function']['name']}:{n}"
                call["id"] = renamed[call["id"]]
            n += 1
        if m.get("role") == "tool" and m.get("tool_call_id") in renamed:
            m["tool_call_id"] = renamed[m["tool_call_id"]]
    return messages


# ---- jobs and the worker ---------------------------------------------------------------------

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


_END = object()


@dataclass(eq=False)
class Job:
    prompt: list[int]
    params: SamplingParams
    tool_names: list[str] | None
    max_tokens: int
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


async def prepare(state: ServerState, messages: list[dict], tools: list[dict] | None,
                  tool_names: list[str] | None, params: SamplingParams) -> Job:
    """Render and tokenize (off the event loop), enforce the prompt limits, size the output budget."""
    engine = state.engine
    try:
        prompt = await run_in_threadpool(engine.apply_chat_template, messages, tools=tools, tokenize=True)
    except (ChatTemplateError, TokenizerError) as exc:
        raise ApiError(400, f"these messages cannot be rendered: {exc}", "messages") from None
    limit = min(state.max_prompt_tokens or engine.context, engine.context - 1)  # leave room for one token
    if len(prompt) > limit:
        which = (f"max_prompt_tokens={state.max_prompt_tokens}" if limit == state.max_prompt_tokens
                 else f"the context of {engine.context} tokens less one")
        raise ApiError(400, f"the prompt is {len(prompt)} tokens, over this server's limit of {limit} ({which}); "
                            "shorten the conversation", "messages", "context_length_exceeded")
    budget = engine.context - len(prompt)  # the answer may fill the rest of the context, never more
    return Job(prompt, params, tool_names, min(params.max_tokens or budget, budget))


async def collect(request: Request, runner: EngineRunner, job: Job) -> tuple[list[Event], Finished]:
    """Run a job to its end for a non-streamed answer; the client hanging up cancels it."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        items = [item async for item in runner.events(job)]
    finally:
        watcher.cancel()
    for item in items:
        if isinstance(item, Failed):
            raise ApiError(500, item.message, None, "server_error")
    fin = next((item for item in items if isinstance(item, Finished)), None)
    if fin is None:
        raise ApiError(503, "the request was cancelled: the server is shutting down", None, "cancelled")
    return [item for item in items if not isinstance(item, (Started, Finished))], fin


class JobStream(StreamingResponse):
    """Server-sent events of one job. However the response ends (done, client gone, error), the job is
    cancelled if it still runs: it stops at its next token, or never starts."""

    def __init__(self, content: AsyncIterator[str], job: Job):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.finished.is_set():
                log.info("request %s: the client disconnected", self.job.id)
                self.job.cancel()


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    log.info("request %s: the client disconnected", job.id)
    job.cancel()


class _Cancellable:
    """The engine as run_chat sees it, but its token stream ends between tokens once the job is
    cancelled, and it reports when the prompt is in the cache."""

    def __init__(self, engine: Any, job: Job, tokens: list[int]):
        self.engine, self.job, self.tokens = engine, job, tokens
        self.tokenizer = engine.tokenizer

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        steps = self.engine.generate(*args, **kwargs)
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
    """One worker thread runs jobs one at a time, in the order they were submitted."""

    def __init__(self, engine: Any):
        self.engine = engine
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.active: Job | None = None
        self.served = self.cancelled = 0
        self._stopping = False
        self._lock = threading.Lock()
        self._in_line = 0  # submitted and not yet finished, the running job included

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

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
        job._loop, job._out = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:
            ahead, self._in_line = self._in_line, self._in_line + 1
        log.info("request %s: %d prompt tokens, queue position %d (%s)", job.id, len(job.prompt), ahead + 1,
                 "starts now" if ahead == 0 else f"{ahead} ahead")
        self._jobs.put(job)
        return job

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
            try:
                self._run(job)
            except Exception as exc:  # a request must never take the worker down
                log.exception("request %s failed", job.id)
                job.emit(Failed(f"generation failed: {type(exc).__name__}: {exc}"))
            finally:
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
        chat = run_chat(_Cancellable(self.engine, job, tokens), job.prompt, job.params, job.tool_names, job.max_tokens)
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
