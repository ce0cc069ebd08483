"""Incremental parser of Kimi K2 Thinking output text into reasoning, content and tool-call events.

Owns: the output grammar (`<think>` reasoning `</think>` content, then `<|tool_calls_section_begin|>`
calls `<|tool_calls_section_end|>`; the section may open before `</think>` and then ends reasoning),
markers split across pieces, and turning malformed calls into ToolCallError events. Must not: raise on
model output, decode tokens (feed it StreamDecoder text), or execute tools.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

logger = logging.getLogger(__name__)

THINK, THINK_END = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
IM_END = "<|im_end|>"

# the model's own id: functions.NAME:IDX (NAME may contain dots; the prefix is optional, as SGLang allows)
_CALL_ID = re.compile(r"(?:functions\.)?(?P<name>[^\s:]+):(?P<index>\d+)")


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCall:
    id: str  # verbatim, e.g. "functions.get_weather:0"; the template renders it back as is
    name: str
    arguments: str  # the model's JSON text, verbatim (validated as a JSON object)


@dataclass(frozen=True)
class ToolCallError:
    raw: str  # the call's text as generated, markers included
    reason: str


Event = ReasoningDelta | ContentDelta | ToolCall | ToolCallError


class _S(Enum):
    START = "start"  # before the optional leading <think>
    REASONING = "reasoning"
    CONTENT = "content"
    SECTION = "section"  # inside the tool section, between calls
    CALL_ID = "call_id"
    CALL_ARGS = "call_args"
    DONE = "done"  # after <|im_end|>: the rest is ignored


_MARKERS = {
    _S.REASONING: (THINK_END, SECTION_BEGIN, IM_END),
    _S.CONTENT: (SECTION_BEGIN, IM_END),
    _S.SECTION: (CALL_BEGIN, SECTION_END, IM_END),
    _S.CALL_ID: (ARG_BEGIN, CALL_END, CALL_BEGIN, SECTION_END, IM_END),
    _S.CALL_ARGS: (CALL_END, CALL_BEGIN, SECTION_END, IM_END),
}
_AFTER = {
    THINK_END: _S.CONTENT,
    SECTION_BEGIN: _S.SECTION,
    SECTION_END: _S.CONTENT,
    CALL_BEGIN: _S.CALL_ID,
    ARG_BEGIN: _S.CALL_ARGS,
    CALL_END: _S.SECTION,
    IM_END: _S.DONE,
}


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class OutputParser:
    """Feed decoded text pieces of one assistant turn; get events. Same merged events for any split.

    tool_names: when given, a call to any other name is a ToolCallError. start_in_reasoning: K2 Thinking
    always thinks, so text before `</think>` is reasoning even without a leading `<think>` (as vLLM's
    kimi_k2 reasoning parser); False for output that starts with content.
    """

    def __init__(self, tool_names: Iterable[str] | None = None, start_in_reasoning: bool = True):
        self.tool_names = frozenset(tool_names) if tool_names is not None else None
        self._state = _S.START if start_in_reasoning else _S.CONTENT
        self._buf = ""  # text not yet consumed: at most a held-back partial marker once a feed returns
        self._acc = ""  # the current call's id or arguments, or junk text in the section
        self._call_id = ""
        self._finished = False

    def feed(self, text: str) -> list[Event]:
        if self._finished:
            logger.warning("OutputParser.feed after finish(); %d chars ignored", len(text))
            return []
        self._buf += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        """End of stream (stop token, stop string or max_tokens): flush text, report an unclosed call."""
        if self._finished:
            return []
        events: list[Event] = []
        rest, self._buf = self._buf, ""
        state = self._state
        if state in (_S.START, _S.REASONING) and rest:
            events.append(ReasoningDelta(rest))
        elif state == _S.CONTENT and rest:
            events.append(ContentDelta(rest))
        elif state == _S.SECTION and (self._acc + rest).strip():
            events.append(ToolCallError(self._acc + rest, "unexpected text in the tool call section"))
        elif state == _S.CALL_ID:
            events.append(ToolCallError(CALL_BEGIN + self._acc + rest, "truncated: output ended inside a tool call"))
        elif state == _S.CALL_ARGS:
            raw = CALL_BEGIN + self._call_id + ARG_BEGIN + self._acc + rest
            events.append(ToolCallError(raw, "truncated: output ended inside a tool call"))
        self._finished = True
        return events

    def _step(self, events: list[Event]) -> bool:
        """Consume what can be decided now; True if a marker was consumed (call again)."""
        state = self._state
        if state == _S.DONE:
            self._buf = ""
            return False
        if state == _S.START:
            head = self._buf.lstrip()
            if head.startswith(THINK):
                self._buf = head[len(THINK) :]
            elif THINK.startswith(head):
                return False  # only whitespace or a prefix of <think> so far
            self._state = _S.REASONING
            return True
        text, marker = self._take(_MARKERS[state])
        if state == _S.REASONING and text:
            events.append(ReasoningDelta(text))
        elif state == _S.CONTENT and text:
            events.append(ContentDelta(text))
        elif state in (_S.SECTION, _S.CALL_ID, _S.CALL_ARGS):
            self._acc += text
        if marker is None:
            return False
        self._on_marker(state, marker, events)
        return True

    def _take(self, markers: tuple[str, ...]) -> tuple[str, str | None]:
        """Split off the text before the earliest marker (and the marker); without one, all but a
        suffix that could still grow into a marker."""
        buf = self._buf
        found = [(i, m) for m in markers if (i := buf.find(m)) >= 0]
        if found:
            i, m = min(found)
            self._buf = buf[i + len(m) :]
            return buf[:i], m
        keep = 0
        start = buf.find("<", max(0, len(buf) - max(map(len, markers)) + 1))
        while start >= 0:  # longest suffix that is a proper prefix of a marker
            suffix = buf[start:]
            if any(m.startswith(suffix) for m in markers):
                keep = len(suffix)
                break
            start = buf.find("<", start + 1)
        self._buf = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], None

    def _on_marker(self, state: _S, marker: str, events: list[Event]) -> None:
        nxt = _AFTER.get(marker)
        if state == _S.SECTION:
            if self._acc.strip():
                events.append(ToolCallError(self._acc, "unexpected text in the tool call section"))
        elif state == _S.CALL_ID:
            if marker == ARG_BEGIN:
                self._call_id, self._acc, self._state = self._acc, "", _S.CALL_ARGS
                return  # keep nothing else: the id is stored
            events.append(ToolCallError(CALL_BEGIN + self._acc + marker, f"tool call id not followed by {ARG_BEGIN}"))
        elif state == _S.CALL_ARGS:
            raw = CALL_BEGIN + self._call_id + ARG_BEGIN + self._acc
            if marker == CALL_END:
                events.append(self._finish_call(raw + marker))
            else:
                events.append(ToolCallError(raw, f"tool call not closed with {CALL_END}"))
        self._acc = ""
        self._state = nxt

    def _finish_call(self, raw: str) -> ToolCall | ToolCallError:
        call_id, arguments = self._call_id.strip(), self._acc
        m = _CALL_ID.fullmatch(call_id)
        if m is None:
            return ToolCallError(raw, f"malformed tool call id {call_id!r}; expected functions.NAME:IDX")
        name = m.group("name")
        if self.tool_names is not None and name not in self.tool_names:
            return ToolCallError(raw, f"unknown tool {name!r}")
        try:
            value = json.loads(arguments, parse_constant=_reject_constant)
        except ValueError as exc:
            return ToolCallError(raw, f"arguments are not valid JSON: {exc}")
        if not isinstance(value, dict):
            return ToolCallError(raw, "arguments are not a JSON object")
        return ToolCall(id=call_id, name=name, arguments=arguments)


def coalesce(events: Iterable[Event]) -> list[Event]:
    """Merge consecutive ReasoningDelta (or ContentDelta) events into one."""
    out: list[Event] = []
    for ev in events:
        if out and isinstance(ev, (ReasoningDelta, ContentDelta)) and type(out[-1]) is type(ev):
            out[-1] = type(ev)(out[-1].text + ev.text)
        else:
            out.append(ev)
    return out


def parse_output(text: str, tool_names: Iterable[str] | None = None, start_in_reasoning: bool = True) -> list[Event]:
    """Whole-text parse (coalesced): feed + finish in one call."""
    parser = OutputParser(tool_names, start_in_reasoning)
    return coalesce(parser.feed(text) + parser.finish())


def assistant_message(events: Iterable[Event]) -> dict:
    """OpenAI-style assistant message (content, reasoning_content, tool_calls) for the next turn's
    history. ToolCallErrors are left out: the caller decides how to report them."""
    reasoning, content, calls = [], [], []
    for ev in events:
        if isinstance(ev, ReasoningDelta):
            reasoning.append(ev.text)
        elif isinstance(ev, ContentDelta):
            content.append(ev.text)
        elif isinstance(ev, ToolCall):
            calls.append({"id": ev.id, "type": "function", "function": {"name": ev.name, "arguments": ev.arguments}})
    message = {"role": "assistant", "content": "".join(content), "reasoning_content": "".join(reasoning)}
    if calls:
        message["tool_calls"] = calls
    return message
