"""What the HTTP APIs share: request bodies, API errors, prompts within limits, and job responses.

Owns reading bodies under a size and depth limit, validation errors that name the field, rendering
and tokenizing messages within the prompt limit (a text too long to fit is refused before it is
tokenized), a job's ending as an HTTP status (a stream's status line waits for its job's first item),
and cancelling a job when its client hangs up. Must not: know either wire format (openai_api.py,
anthropic_api.py) or run generation (runner.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from hybrid.text.template import ChatTemplateError
from hybrid.serve.runner import EngineRunner, Failed, Finished, Job, QueueFull, ShuttingDown, Started
from hybrid.text.parser import Event
from hybrid.model.sampling import SamplingError, SamplingParams
from hybrid.text.tokenizer import MARK_CLOSE, MARK_OPEN, TokenizerError

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 100
TOKENIZE_AT_ONCE = 2


class ApiError(Exception):
    """An invalid request: HTTP status, a message naming the problem, and the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


@dataclass
class ServerState:
    engine: Any  # hybrid.Engine, or anything with its tokenizer / context / generate / apply_chat_template /
    #              chat_prompt / answer_budget
    runner: EngineRunner
    model_name: str
    max_body_bytes: int
    max_prompt_tokens: int | None
    keepalive_s: float | None = None  # a streamed answer sends an SSE comment after this long without data
    token_bytes: int = 0  # the most bytes one token stands for (longest_token_bytes); 0: no cheap bound
    # prompts rendered and tokenized at once: CPU-bound work, whose memory (~20 bytes per byte of text
    # tokenized) this bounds to a few prompts' worth whatever the number of requests
    tokenizing: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(TOKENIZE_AT_ONCE))


def longest_token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes one token of this tokenizer stands for: its longest BPE rank or special-token
    name. A text of n bytes is at least n / this many tokens, however it is split."""
    ranks = max(map(len, tokenizer.encoding.token_byte_values()))
    return max([ranks] + [len(name.encode()) for name in tokenizer.special_tokens])


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
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json":  # also keeps browsers' form and text posts (no CORS preflight) out
        raise ApiError(415, f"Content-Type must be application/json, got {kind!r}", None, "unsupported_media_type")
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


def join_text_parts(parts: list, where: str, refusal: str) -> str:
    """The text of a content list: each part {"type": "text", "text": str}; anything else (images, audio,
    documents: K2 reads text) is a 400 naming parts' path `where` and saying `refusal`."""
    out = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}[{j}]: {refusal}, got type {kind!r}", f"{where}[{j}]")
        out.append(part["text"])
    return "".join(out)


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


async def prepare(state: ServerState, messages: list[dict], tools: list[dict] | None,
                  tool_names: list[str] | None, params: SamplingParams, forced: str = "") -> Job:
    """Render and tokenize (off the event loop), enforce the prompt limits, size the output budget.
    forced: the start of the assistant's turn (a tool call that tool_choice demands), appended."""
    engine = state.engine
    limit = min(state.max_prompt_tokens or engine.context, engine.context - 1)  # leave room for one token
    try:
        async with state.tokenizing:
            prompt = await run_in_threadpool(_prompt_within, state, limit, messages, tools, forced)
    except (ChatTemplateError, TokenizerError) as exc:
        raise ApiError(400, f"these messages cannot be rendered: {exc}", "messages") from None
    if len(prompt) > limit:
        raise _too_long(state, limit, str(len(prompt)))
    return Job(prompt, params, tool_names, engine.answer_budget(prompt, params.max_tokens), forced)


def _prompt_within(state: ServerState, limit: int, messages: list[dict], tools: list[dict] | None,
                   forced: str) -> list[int]:
    """The prompt's ids, refusing before tokenizing a text too long to fit (tokenizing costs ~0.4 s per
    MB of text and ~20 bytes of memory per byte; rendering a small fraction of that). Sound: a token
    stands for at most state.token_bytes bytes, so more than limit * token_bytes bytes is more than limit
    tokens."""
    if state.token_bytes:
        text = state.engine.apply_chat_template(messages, tools=tools)  # what chat_prompt tokenizes, unmarked
        n = utf8_len(text) - 4 * (text.count(MARK_OPEN) + text.count(MARK_CLOSE))  # it drops these (4 bytes each)
        if n > limit * state.token_bytes:
            raise _too_long(state, limit, f"at least {-(-n // state.token_bytes)} ({n} bytes)")
    return state.engine.chat_prompt(messages, tools, forced)


def _too_long(state: ServerState, limit: int, tokens: str) -> ApiError:
    which = (f"max_prompt_tokens={state.max_prompt_tokens}" if limit == state.max_prompt_tokens
             else f"the context of {state.engine.context} tokens less one")
    return ApiError(400, f"the prompt is {tokens} tokens, over this server's limit of {limit} ({which}); "
                         "shorten the conversation", "messages", "context_length_exceeded")


def utf8_len(text: str) -> int:
    """len(text.encode()) without a copy of a long text (lone surrogates count as 3 bytes)."""
    if text.isascii():
        return len(text)
    step = 1 << 20
    return sum(len(text[i:i + step].encode("utf-8", "surrogatepass")) for i in range(0, len(text), step))


def submit(state: ServerState, job: Job) -> Job:
    """Queue the job, or refuse it: 429 with Retry-After when max_queue requests already wait, 503 when
    the server is shutting down."""
    try:
        return state.runner.submit(job)
    except QueueFull as full:
        raise ApiError(429, f"the server is busy: {full.waiting} requests are already waiting for the model "
                            f"(max_queue={state.runner.max_queue}); retry in about {full.retry_after_s} s",
                       None, "queue_full", {"Retry-After": str(full.retry_after_s)}) from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down; retry later", None, "shutting_down") from None


async def collect(request: Request, runner: EngineRunner, job: Job) -> tuple[list[Event], Finished]:
    """Run a job to its end for a non-streamed answer; the client hanging up cancels it."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        items = [item async for item in runner.events(job)]
    finally:
        client_left = watcher.done() and not watcher.cancelled()  # it returns only once the client hung up
        watcher.cancel()
    for item in items:
        if isinstance(item, Failed):
            raise ApiError(item.status, item.message, None, item.code)
    fin = next((item for item in items if isinstance(item, Finished)), None)
    if fin is None and client_left:  # nobody reads this answer; the status is for the log (nginx's 499)
        raise ApiError(499, "the client disconnected before the answer was ready; the request was cancelled",
                       None, "client_closed_request")
    if fin is None:
        raise ApiError(503, "the request was cancelled: the server is shutting down", None, "cancelled")
    return [item for item in items if not isinstance(item, (Started, Finished))], fin


KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: every client's event parser skips it


async def with_keepalive(content: AsyncIterator[str], every_s: float | None) -> AsyncIterator[str]:
    """content, plus KEEPALIVE whenever nothing came for every_s seconds (waiting in the queue, a long
    prefill): proxies and clients with read timeouts see a live connection, not a stalled one."""
    if every_s is None:
        async for chunk in content:
            yield chunk
        return
    it = content.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield KEEPALIVE
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                pending = None
                return
            pending = None
            yield chunk
    finally:
        if pending is not None:  # the response ended early: stop the content where it waits
            pending.cancel()


class JobStream(StreamingResponse):
    """Server-sent events of one job. The status line waits for the job's first item (at most keepalive_s,
    then keepalive comments flow): a job that ends before it starts (the server shutting down) is then an
    error with its own status and body, not a 200 stream. However the response ends (done, client gone,
    error), the job is cancelled if it still runs: it stops at its next token, or never starts."""

    def __init__(self, content: AsyncIterator[str], job: Job, keepalive_s: float | None = None):
        super().__init__(with_keepalive(content, keepalive_s), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.job, self.hold_s = job, keepalive_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if await self._opened(receive):
                await super().__call__(scope, receive, send)
        finally:
            if not self.job.finished.is_set():
                log.info("request %s: the client disconnected", self.job.id)
                self.job.cancel()

    async def _opened(self, receive: Receive) -> bool:
        """Wait for the job's first item, the client leaving, or hold_s. False: the client left. Raises
        the ApiError of a job that failed before anything else came."""
        first = asyncio.ensure_future(self.job.opening())
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({first, gone}, timeout=self.hold_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            first.cancel()
            gone.cancel()
        if gone.done() and not gone.cancelled():
            return False
        failed = first.result() if first.done() and not first.cancelled() else None
        if failed is not None:
            raise ApiError(failed.status, failed.message, None, failed.code)
        return True


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    await _disconnected(request.receive)
    log.info("request %s: the client disconnected", job.id)
    job.cancel()
