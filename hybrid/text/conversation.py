"""One chat request: messages -> prompt ids -> generated tokens -> parsed events, with stop strings.

Owns turning the generation stream into OpenAI-style events (reasoning, content, tool calls) and the
closing `Done` record (finish reason, token counts, timings). The engine owns the model and the KV
cache; the template, tokenizer and parser are used as they are, never re-implemented here.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from hybrid.text.parser import ContentDelta, Event, OutputParser, ReasoningDelta, ToolCall

if TYPE_CHECKING:  # hybrid.model.sampling imports torch: run_chat imports it when it runs, so the CLI starts without
    from hybrid.model.sampling import SamplingParams


@dataclass(frozen=True)
class Done:
    finish_reason: str  # 'stop', 'length' or 'tool_calls'
    prompt_tokens: int
    prefill_tokens: int  # prompt tokens computed; the rest came from the KV cache
    completion_tokens: int
    reasoning_tokens: int
    prefill_s: float
    decode_s: float


def forced_call_prefix(messages: list[dict], name: str | None) -> str:
    """The start of an assistant turn that makes it a tool call (tool_choice 'required' or a named
    function): reasoning closed, the tool section opened, and for a named function its K2 id
    `functions.NAME:IDX` (IDX counts the conversation's earlier calls) up to the arguments. Appended to
    the prompt, so the model only writes the rest; there is no reasoning for such a turn."""
    head = "<think></think><|tool_calls_section_begin|><|tool_call_begin|>functions."
    if name is None:
        return head  # the model picks which declared tool
    idx = sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")
    return f"{head}{name}:{idx}<|tool_call_argument_begin|>"


CALLABLE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what the OpenAI and Anthropic APIs accept as a name
ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer name for system


def template_role(role: str) -> str:
    """The role as the K2 template knows it: OpenAI's `developer` (its newer name for system) is `system`.
    The one place for that rule: the engine, the servers and the CLI's /load all go through it."""
    return "system" if role == "developer" else role


def check_message(m: Any, where: str) -> None:
    """One chat message as the K2 template reads it (OpenAI style, plus reasoning_content), or a
    ValueError that names `where` and says what is wrong: the template itself would render a bad
    one into a wrong prompt (a missing role as a system turn, say) rather than fail."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ValueError(f"{where} needs a \"role\" of {', '.join(ROLES)}")
    content, calls = m.get("content"), m.get("tool_calls")
    if m["role"] == "assistant" and calls is not None:
        if not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str) for c in calls):
            raise ValueError(f"{where}: \"tool_calls\" must be a list of "
                             '{"id": ..., "function": {"name": ..., "arguments": ...}}')
    if content is None and m["role"] != "assistant":  # an assistant turn may be a tool call alone
        raise ValueError(f"{where} ({m['role']}) needs a \"content\": a string or a list of text parts")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: content part {j} must be {{\"type\": \"text\", \"text\": \"...\"}} "
                                 "(Kimi K2 reads text)")
    elif content is not None and not isinstance(content, str):
        raise ValueError(f"{where} has a \"content\" that is not text (a string or a list of text parts)")
    if not isinstance(m.get("reasoning_content", ""), (str, type(None))):
        raise ValueError(f"{where}: \"reasoning_content\" must be a string")
    if m["role"] == "tool" and not isinstance(m.get("tool_call_id"), str):
        raise ValueError(f"{where} (tool) needs the \"tool_call_id\" of the call it answers")


def check_tools(tools: Any, where: str, item: Callable[[int], str]) -> None:
    """OpenAI-format tool definitions: [{"type": "function", "function": {"name", "description"?,
    "parameters"?}}], each checked. An error names `where` (the list) or item(index)."""
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"{where}: \"tools\" must be a list of tool definitions "
                         '([{"type": "function", "function": {"name": ..., "parameters": {...}}}])')
    for i, t in enumerate(tools):
        at = item(i)
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise ValueError(f"{at} must be an object {{\"type\": \"function\", \"function\": {{...}}}}, "
                             f"got {json.dumps(t, default=repr)[:80]}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{at}: function.name must be a non-empty string")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ValueError(f"{at} ({fn['name']}): function.parameters must be a JSON schema object")
        if "description" in fn and not isinstance(fn["description"], str):
            raise ValueError(f"{at} ({fn['name']}): function.description must be a string")


class ToolReplyError(ValueError):
    """A tool message that answers no call: `index` is the message's, `field` 'role' (no assistant
    message with tool_calls right before it) or 'tool_call_id' (that message made no call of this id)."""

    def __init__(self, message: str, index: int, field: str):
        super().__init__(message)
        self.index, self.field = index, field


def check_tool_replies(messages: list[dict]) -> None:
    """OpenAI's rule for tool messages: each follows an assistant message with tool_calls (only other
    tool messages between them) and answers one of its calls by id; else a ToolReplyError. A reply to
    nothing would render as a result of a call the model never made."""
    calls: set[str] | None = None  # ids of the assistant's calls that tool messages may answer now
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "assistant":
            calls = {c.get("id") for c in m.get("tool_calls") or []} or None
        elif role == "tool":
            if calls is None:
                raise ToolReplyError(f"messages[{i}]: messages with role 'tool' must be a response to a "
                                     "preceding message with 'tool_calls'", i, "role")
            if m.get("tool_call_id") not in calls:
                raise ToolReplyError(f"messages[{i}]: 'tool_call_id' of {m.get('tool_call_id')!r} not found in "
                                     "'tool_calls' of the previous assistant message "
                                     f"(its calls: {', '.join(sorted(map(str, calls)))})", i, "tool_call_id")
        else:
            calls = None


class ToolChoiceError(ValueError):
    """A tool_choice that cannot be honoured, or tools that cannot be declared. field: 'tool_choice'
    (no tools to call), 'tool_choice.name' (the named tool is not among them) or 'tools' (one is
    malformed); each API spells its own path from it."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def apply_tool_choice(tools: list[dict] | None, messages: list[dict], mode: str,
                      name: str | None = None) -> tuple[list[dict] | None, list[str] | None, str]:
    """The one tool_choice rule of Engine.chat and both server APIs.

    tools: OpenAI-style function tools. mode: 'auto' (the model decides), 'none' (the tools are not
    declared and no call is accepted), 'required' (the answer is a call of one of them) or 'named'
    (the answer calls `name`). -> (tools for the template, names the parser accepts, the forced
    start of the assistant's turn, see forced_call_prefix)."""
    for i, t in enumerate(tools or []):  # the template renders every tool: a malformed one is an error here
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolChoiceError(f'tools[{i}] must look like {{"type": "function", "function": {{"name": NAME, ...}}}}, '
                                  f"got {t!r}", "tools")
    names = [t["function"]["name"] for t in tools or []]
    if mode == "auto":
        return tools or None, names or None, ""
    if mode == "none":
        return None, [], ""
    if not names:
        raise ToolChoiceError("tool_choice asks for a tool call but no tools were given", "tool_choice")
    if mode == "required":
        return tools, names, forced_call_prefix(messages, None)
    if not name:
        raise ToolChoiceError("a tool_choice that forces one tool needs that tool's name", "tool_choice.name")
    if name not in names:
        raise ToolChoiceError(f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})",
                              "tool_choice.name")
    if not CALLABLE_NAME.fullmatch(name):  # it goes into the prompt as control text: no tokens of its own
        raise ToolChoiceError(f"tool_choice names {name!r}; a forced call needs a function name of letters, digits, "
                              "'_' and '-' (at most 64), as the OpenAI and Anthropic APIs require", "tool_choice.name")
    return tools, [name], forced_call_prefix(messages, name)


def run_chat(engine, prompt: list[int], params: SamplingParams, tool_names: list[str] | None,
             max_tokens: int, forced: str = "") -> Iterator[Event | Done]:
    """forced: text the prompt already ends with that belongs to the assistant's turn (see
    forced_call_prefix); the parser reads it first, so the answer parses as if the model wrote it."""
    from hybrid.model.sampling import StopMatcher

    tok = engine.tokenizer
    parser = OutputParser(tool_names)
    yield from parser.feed(forced)
    stream = tok.stream()
    stops = StopMatcher(params.stop)
    n_gen = n_reasoning = prefill = 0
    t_first = t_end = 0.0
    finish, by_string = "length", False
    saw_call = False
    for step in engine.generate(prompt, max_tokens, sampling=params, stop_ids=tok.stop_ids):
        if step.index == 0:
            prefill, t_first = step.prefill_tokens, step.elapsed_s
        t_end = step.elapsed_s
        n_gen += 1
        if step.finish == "stop":  # <|im_end|>: not part of the answer
            finish = "stop"
            break
        text, stopped = stops.feed(stream.push(step.token))
        events = parser.feed(text)
        if events and all(isinstance(e, ReasoningDelta) for e in events):
            n_reasoning += 1
        saw_call = saw_call or any(isinstance(e, ToolCall) for e in events)
        yield from events
        if stopped:
            finish, by_string = "stop", True
            break
        if step.finish:
            finish = step.finish
    # text held back for a stop string that never completed is part of the answer
    tail = [] if by_string else parser.feed(stops.flush() + stream.finish())
    events = tail + parser.finish()
    saw_call = saw_call or any(isinstance(e, ToolCall) for e in events)
    yield from events
    if saw_call and finish == "stop":
        finish = "tool_calls"
    yield Done(finish, len(prompt), prefill, n_gen, n_reasoning, t_first, t_end - t_first)


__all__ = ["Done", "ToolChoiceError", "ToolReplyError", "apply_tool_choice", "check_tool_replies",
           "forced_call_prefix", "run_chat"]
