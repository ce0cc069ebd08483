"""OpenAI Chat Completions over the engine: POST /v1/chat/completions, plain JSON and SSE.

Owns the OpenAI wire format: request validation, messages and tools for the K2 template, tool_choice,
`reasoning_content` in messages and deltas, tool_calls, finish_reason and usage (cached prompt tokens,
reasoning tokens). Must not: queue or run generation itself (engine_runner.EngineRunner does).
"""
from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from hybrid.serve.common import (ApiError, JobStream, ServerState, check_model, collect, join_text_parts,
                         normalize_tool_ids, prepare, read_json, sampling_params, server_state, submit, validate)
from hybrid.text.conversation import (ToolChoiceError, ToolReplyError, apply_tool_choice, check_tool_replies,
                                      template_role)
from hybrid.serve.runner import Failed, Finished, Job, Started
from hybrid.text.parser import ContentDelta, ReasoningDelta, ToolCall, ToolCallError

log = logging.getLogger(__name__)
router = APIRouter()


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send vendor extras; unknown fields are ignored


class FunctionDef(_Open):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDef


class CalledFunction(_Open):
    name: str
    arguments: str | dict


class ToolCallIn(_Open):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class NamedChoice(_Open):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Open):
    include_usage: StrictBool = False


class ChatRequest(_Open):
    """Scalars are typed strictly, as OpenAI's API checks them: "5", true or 5.0 is no integer, "0.5"
    or true no number, "true" or 1 no boolean (an integer is a number)."""
    model: str
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedChoice | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None  # vLLM-style extras
    min_p: StrictFloat | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    n: StrictInt | None = None
    frequency_penalty: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    parallel_tool_calls: StrictBool | None = None
    logit_bias: dict | None = None
    response_format: dict | None = None


_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "a boolean"}
_FIELD_PATH = re.compile(r"[a-z_]+(\.[a-z_]+|\[\d+\])*")


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    kinds = {int: "an integer", float: "a decimal number", str: "a string", list: "an array", dict: "an object"}
    return next((v for k, v in kinds.items() if isinstance(value, k)), "null")


def _request(data: dict) -> ChatRequest:
    """The request, or a 400: a scalar of the wrong type in OpenAI's words ("Invalid type for
    'max_tokens': expected an integer, but got a string instead."), anything else as common.validate says."""
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
            if err["type"] in _EXPECTED and _FIELD_PATH.fullmatch(path):  # not a union member's tag
                raise ApiError(400, f"Invalid type for '{path}': expected {_EXPECTED[err['type']]}, "
                                    f"but got {_json_kind(err['input'])} instead.", path, "invalid_type") from None
    return validate(ChatRequest, data)


def _text(content: str | list[dict] | None, where: str) -> str:
    """Message content as text: a string, or text parts (images and audio are refused: K2 reads text)."""
    if content is None or isinstance(content, str):
        return content or ""
    return join_text_parts(content, where, "only text parts are supported (type 'text' with a 'text' string)")


def _messages(req: ChatRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        if m.content is None and m.role != "assistant":  # an assistant turn may be tool calls alone
            raise ApiError(400, f"messages[{i}].content is required for a {m.role} message", f"messages[{i}].content",
                           "missing_required_parameter")
        msg: dict[str, Any] = {"role": template_role(m.role),
                               "content": _text(m.content, f"messages[{i}].content")}
        if m.name:
            msg["name"] = m.name  # the K2 template shows it as the speaker
        if m.role == "assistant":
            reasoning = m.reasoning_content if m.reasoning_content is not None else (m.model_extra or {}).get("reasoning")
            if isinstance(reasoning, str):
                msg["reasoning_content"] = reasoning  # kept by the template for the current tool loop
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                     for c in m.tool_calls]
        if m.role == "tool":
            if not m.tool_call_id:
                raise ApiError(400, f"messages[{i}].tool_call_id is required for a tool message",
                               f"messages[{i}].tool_call_id", "missing_required_parameter")
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    try:  # on the client's own ids, before normalize_tool_ids renames them
        check_tool_replies(out)
    except ToolReplyError as e:
        raise ApiError(400, f"Invalid parameter: {e}", f"messages[{e.index}].{e.field}") from None
    return normalize_tool_ids(out)


def _tools(req: ChatRequest, messages: list[dict]) -> tuple[list[dict] | None, list[str] | None, str]:
    """-> (tools for the template, names the parser accepts, the forced start of the answer), by
    conversation.apply_tool_choice: 'auto' (or absent), 'none', 'required', or a named function."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []] or None
    choice = req.tool_choice
    mode, name = (choice or "auto", None) if choice is None or isinstance(choice, str) else ("named", choice.function.name)
    try:
        return apply_tool_choice(tools, messages, mode, name)
    except ToolChoiceError as e:
        raise ApiError(400, str(e), "tool_choice.function.name" if e.field == "tool_choice.name" else e.field) from None


def _refuse_unsupported(req: ChatRequest) -> None:
    if req.n not in (None, 1):
        raise ApiError(400, f"n={req.n}: this server returns one choice per request", "n", "unsupported_value")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0):
            raise ApiError(400, f"{name} is not supported (only 0)", name, "unsupported_value")
    if req.logprobs:
        raise ApiError(400, "logprobs are not supported", "logprobs", "unsupported_value")
    if req.logit_bias:  # {} is what some clients send by default: nothing asked
        raise ApiError(400, "logit_bias is not supported", "logit_bias", "unsupported_value")
    if req.response_format and req.response_format.get("type") != "text":
        raise ApiError(400, f"response_format {req.response_format.get('type')!r} is not supported (only 'text')",
                       "response_format", "unsupported_value")


def usage(fin: Finished) -> dict:
    d = fin.done
    return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
            "total_tokens": d.prompt_tokens + d.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": d.prompt_tokens - d.prefill_tokens},
            "completion_tokens_details": {"reasoning_tokens": d.reasoning_tokens}}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    state = server_state(request)
    req = _request(await read_json(request, state.max_body_bytes))
    check_model(state, req.model)
    _refuse_unsupported(req)
    messages = _messages(req)
    tools, names, forced = _tools(req, messages)
    max_tokens, max_name = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens is not None
                            else (req.max_tokens, "max_tokens"))
    params = sampling_params({"max_tokens": max_name}, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                             min_p=req.min_p, seed=req.seed, max_tokens=max_tokens,
                             stop=[req.stop] if isinstance(req.stop, str) else req.stop)
    job = submit(state, await prepare(state, messages, tools, names, params, forced))
    head = {"id": f"chatcmpl-{job.id}", "created": int(time.time()), "model": state.model_name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return JobStream(_stream(state, job, head, include_usage), job, state.keepalive_s)
    return JSONResponse(await _complete(request, state, job, head))


def _call(ev: ToolCall) -> dict:
    return {"id": ev.id, "type": "function", "function": {"name": ev.name, "arguments": ev.arguments}}


async def _complete(request: Request, state: ServerState, job: Job, head: dict) -> dict:
    events, fin = await collect(request, state.runner, job)
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.raw if isinstance(e, ToolCallError) else e.text
                      for e in events if isinstance(e, (ContentDelta, ToolCallError)))
    calls = [_call(e) for e in events if isinstance(e, ToolCall)]
    _warn_malformed(job, events)
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None,
                               "reasoning_content": reasoning}
    if calls:
        message["tool_calls"] = calls
    choice = {"index": 0, "message": message, "finish_reason": fin.done.finish_reason, "logprobs": None}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(fin)}


def _warn_malformed(job: Job, events: list) -> None:
    for e in events:
        if isinstance(e, ToolCallError):
            log.warning("request %s: a malformed tool call is passed on as text (%s)", job.id, e.reason)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(state: ServerState, job: Job, head: dict, include_usage: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}  # as OpenAI: usage null on all but the last chunk

    def chunk(delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return _sse({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

    n_calls = 0
    async for item in state.runner.events(job):
        if isinstance(item, Started):
            yield chunk({"role": "assistant", "content": ""})
        elif isinstance(item, ReasoningDelta):
            yield chunk({"reasoning_content": item.text})
        elif isinstance(item, ContentDelta):
            yield chunk({"content": item.text})
        elif isinstance(item, ToolCallError):
            _warn_malformed(job, [item])
            yield chunk({"content": item.raw})
        elif isinstance(item, ToolCall):
            yield chunk({"tool_calls": [{"index": n_calls, **_call(item)}]})
            n_calls += 1
        elif isinstance(item, Finished):
            yield chunk({}, item.done.finish_reason)
            if include_usage:
                yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(item)})
        elif isinstance(item, Failed):
            yield _sse({"error": {"message": item.message, "type": "server_error", "param": None, "code": item.code}})
    yield "data: [DONE]\n\n"
