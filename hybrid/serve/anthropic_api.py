"""Anthropic Messages over the engine: POST /v1/messages (plain JSON and SSE) and its count_tokens.

Owns the Anthropic wire format: system, thinking / text / tool_use / tool_result blocks turned into the
K2 template's messages, the response blocks, stop_reason, usage (cache reads from KV prefix reuse), and
the streaming events in Anthropic's order. Must not: queue or run generation itself (engine_runner does).
"""
from __future__ import annotations

import json
import logging
from typing import Annotated, Any, AsyncIterator, Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from hybrid.serve.common import (ApiError, JobStream, ServerState, check_model, collect, join_text_parts,
                         normalize_tool_ids, prepare, read_json, sampling_params, server_state, submit, validate)
from hybrid.text.conversation import ToolChoiceError, apply_tool_choice
from hybrid.serve.runner import Failed, Finished, Job, Started
from hybrid.text.parser import ContentDelta, ReasoningDelta, ToolCall, ToolCallError

log = logging.getLogger(__name__)
router = APIRouter()


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextBlock(_Open):
    type: Literal["text"]
    text: str


class ThinkingBlock(_Open):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Open):
    type: Literal["redacted_thinking"]


class ToolUseBlock(_Open):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict


class ToolResultBlock(_Open):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[dict] | None = None
    is_error: StrictBool = False


class OtherBlock(_Open):  # image, document, ...: refused with a clear message after validation
    type: Literal["image", "document", "search_result", "server_tool_use", "web_search_tool_result"]


Block = Annotated[Union[TextBlock, ThinkingBlock, RedactedThinkingBlock, ToolUseBlock, ToolResultBlock, OtherBlock],
                  Field(discriminator="type")]


class Message(_Open):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(_Open):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict
    type: Literal["custom"] | None = None  # Anthropic's server tools (bash, web search, ...) are not offered


class ToolChoice(_Open):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class Thinking(_Open):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: StrictInt | None = None


class MessagesRequest(_Open):
    """Scalars are typed strictly, as Anthropic's API checks them ("max_tokens: Input should be a valid
    integer" for "5", true or 5.0)."""
    model: str
    max_tokens: StrictInt
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[StrictStr] | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None
    stream: StrictBool = False
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class CountTokensRequest(MessagesRequest):
    max_tokens: StrictInt | None = None  # type: ignore[assignment]


def _result_text(block: ToolResultBlock, where: str) -> str:
    content = block.content
    if isinstance(content, list):
        content = join_text_parts(content, f"{where}.content", "tool results may hold text blocks only")
    return f"Error: {content or ''}" if block.is_error else content or ""


def _check_result(block: ToolResultBlock, uses: set[str], where: str) -> None:
    """A tool_result answers a tool_use of the assistant's last message, as Anthropic's API requires."""
    if block.tool_use_id not in uses:
        raise ApiError(400, f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: {block.tool_use_id}. "
                            "Each `tool_result` block must have a corresponding `tool_use` block in the previous "
                            "message.", f"{where}.tool_use_id")


def _messages(req: MessagesRequest) -> list[dict]:
    """Anthropic turns -> the OpenAI-style messages the K2 template reads."""
    out: list[dict[str, Any]] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else "".join(b.text for b in req.system)
        out.append({"role": "system", "content": system})
    uses: set[str] = set()  # ids of the tool_use blocks of the last assistant message: results answer those
    for i, m in enumerate(req.messages):
        if m.role == "assistant":
            uses = set() if isinstance(m.content, str) else {b.id for b in m.content if isinstance(b, ToolUseBlock)}
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text, reasoning, calls = [], [], []
        for j, b in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(b, TextBlock):
                text.append(b.text)
            elif m.role == "user" and isinstance(b, ToolResultBlock):
                _check_result(b, uses, where)
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": _result_text(b, where)})
            elif m.role == "assistant" and isinstance(b, ThinkingBlock):
                reasoning.append(b.thinking)
            elif m.role == "assistant" and isinstance(b, RedactedThinkingBlock):
                continue  # opaque to this model
            elif m.role == "assistant" and isinstance(b, ToolUseBlock):
                calls.append({"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}})
            else:
                raise ApiError(400, f"{where}: {b.type} blocks are not supported in {m.role} messages here "
                                    "(Kimi K2 Thinking reads text)", where)
        if m.role == "user" and (text or not out or out[-1]["role"] != "tool"):
            out.append({"role": "user", "content": "".join(text)})
        elif m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(text), "reasoning_content": "".join(reasoning)}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    if req.messages[-1].role == "assistant":
        raise ApiError(400, "the last message is from the assistant: continuing a prefilled answer is not supported; "
                            "end with a user message", f"messages[{len(req.messages) - 1}].role")
    return normalize_tool_ids(out)


def _tools(req: MessagesRequest, messages: list[dict]) -> tuple[list[dict] | None, list[str] | None, str]:
    """-> (OpenAI-style tools for the template, names the parser accepts, the forced start of the
    answer), by conversation.apply_tool_choice: 'any' is 'required', 'tool' a named one."""
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                               "parameters": t.input_schema}} for t in req.tools or []] or None
    choice = req.tool_choice.type if req.tool_choice else "auto"
    mode = {"any": "required", "tool": "named"}.get(choice, choice)
    try:
        return apply_tool_choice(tools, messages, mode, req.tool_choice.name if choice == "tool" else None)
    except ToolChoiceError as e:
        raise ApiError(400, str(e), e.field) from None


async def _job(state: ServerState, req: MessagesRequest) -> Job:
    messages = _messages(req)
    tools, names, forced = _tools(req, messages)
    params = sampling_params({"stop": "stop_sequences"}, temperature=req.temperature, top_p=req.top_p,
                             top_k=req.top_k, max_tokens=req.max_tokens, stop=req.stop_sequences)
    return await prepare(state, messages, tools, names, params, forced)


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Any:
    state = server_state(request)
    req = validate(CountTokensRequest, await read_json(request, state.max_body_bytes))
    check_model(state, req.model)
    req.max_tokens = None
    job = await _job(state, req)
    return {"input_tokens": len(job.prompt)}


@router.post("/v1/messages")
async def messages(request: Request) -> Any:
    state = server_state(request)
    req: MessagesRequest = validate(MessagesRequest, await read_json(request, state.max_body_bytes))
    check_model(state, req.model)
    job = submit(state, await _job(state, req))
    # K2 Thinking always thinks; its thinking blocks are left out only when the client turns thinking off
    show_thinking = not (req.thinking and req.thinking.type == "disabled")
    if req.stream:
        return JobStream(_stream(state, job, show_thinking), job, state.keepalive_s)
    events, fin = await collect(request, state.runner, job)
    content = [block for _, block in _blocks(events, show_thinking)]
    body = {**_head(state, job), "content": content, **_stop(fin), "usage": _usage(job, fin.done.prefill_tokens, fin)}
    return JSONResponse(body)


def _head(state: ServerState, job: Job) -> dict:
    return {"id": f"msg_{job.id}", "type": "message", "role": "assistant", "model": state.model_name}


def _stop(fin: Finished) -> dict:
    reason = {"length": "max_tokens", "tool_calls": "tool_use"}.get(fin.done.finish_reason, "end_turn")
    if fin.stop_sequence is not None:
        reason = "stop_sequence"
    return {"stop_reason": reason, "stop_sequence": fin.stop_sequence}


def _usage(job: Job, prefill: int, fin: Finished | None) -> dict:
    # Anthropic counts input as input_tokens (computed) + cache_read_input_tokens (reused from the KV cache)
    return {"input_tokens": prefill, "cache_read_input_tokens": len(job.prompt) - prefill,
            "cache_creation_input_tokens": 0, "output_tokens": fin.done.completion_tokens if fin else 0}


def _blocks(events: list, show_thinking: bool) -> list[tuple[str, dict]]:
    """Coalesced content blocks: (kind, block) with kind 'thinking', 'text' or 'tool_use'."""
    out: list[tuple[str, dict]] = []
    for e in events:
        kind, piece = _piece(e, show_thinking)
        if kind is None:
            continue
        if kind == "tool_use":
            out.append((kind, piece))
        elif out and out[-1][0] == kind:
            out[-1][1][kind] += piece[kind]
        else:
            out.append((kind, dict(piece)))
    return out


def _piece(e: Any, show_thinking: bool) -> tuple[str | None, dict]:
    if isinstance(e, ReasoningDelta):
        return ("thinking", {"type": "thinking", "thinking": e.text, "signature": ""}) if show_thinking else (None, {})
    if isinstance(e, ContentDelta):
        return "text", {"type": "text", "text": e.text}
    if isinstance(e, ToolCallError):
        log.warning("a malformed tool call is passed on as text (%s)", e.reason)
        return "text", {"type": "text", "text": e.raw}
    if isinstance(e, ToolCall):
        return "tool_use", {"type": "tool_use", "id": e.id, "name": e.name, "input": json.loads(e.arguments)}
    return None, {}


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


async def _stream(state: ServerState, job: Job, show_thinking: bool) -> AsyncIterator[str]:
    """message_start, then per block content_block_start / _delta... / _stop, then message_delta
    (stop_reason, usage) and message_stop."""
    open_kind, index = None, -1
    async for item in state.runner.events(job):
        if isinstance(item, Started):
            message = {**_head(state, job), "content": [], "stop_reason": None, "stop_sequence": None,
                       "usage": _usage(job, item.prefill_tokens, None)}
            yield _event("message_start", {"message": message})
            continue
        if isinstance(item, Failed):
            kind = "overloaded_error" if item.status == 503 else "api_error"  # 503: shutting down
            yield _event("error", {"error": {"type": kind, "message": item.message}})
            continue  # the end of the job's events follows
        if isinstance(item, Finished):
            if open_kind is not None:
                yield _event("content_block_stop", {"index": index})
            usage = {"output_tokens": item.done.completion_tokens}
            yield _event("message_delta", {"delta": _stop(item), "usage": usage})
            yield _event("message_stop", {})
            continue
        kind, piece = _piece(item, show_thinking)
        if kind is None:
            continue
        if open_kind is not None and kind != open_kind:
            yield _event("content_block_stop", {"index": index})
            open_kind = None
        if open_kind is None:
            index += 1
            start = {**piece, "input": {}} if kind == "tool_use" else {**piece, kind: ""}
            yield _event("content_block_start", {"index": index, "content_block": start})
            open_kind = kind
        if kind == "thinking":
            yield _event("content_block_delta", {"index": index, "delta": {"type": "thinking_delta", "thinking": piece["thinking"]}})
        elif kind == "text":
            yield _event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": piece["text"]}})
        else:
            args = json.dumps(piece["input"], ensure_ascii=False)
            yield _event("content_block_delta", {"index": index, "delta": {"type": "input_json_delta", "partial_json": args}})
            yield _event("content_block_stop", {"index": index})
            open_kind = None
