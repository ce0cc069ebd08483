"""A finished chat answer: what Engine.complete returns, collected from Engine.chat's event stream.

Owns folding the stream (reasoning, content, tool calls, then Done) into one value; it generates nothing
and parses nothing (text/parser.py did), so the streaming and the non-streaming answer cannot differ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from hybrid.text.conversation import Done
from hybrid.text.parser import ContentDelta, Event, ReasoningDelta, ToolCall, ToolCallError, assistant_message


@dataclass(frozen=True)
class Completion:
    content: str  # the answer's text
    reasoning: str  # the thinking before it ('' when none)
    tool_calls: tuple[ToolCall, ...]  # calls the model made, in order (finish_reason 'tool_calls')
    tool_call_errors: tuple[ToolCallError, ...]  # calls it tried to make but got wrong (not in tool_calls)
    finish_reason: str  # 'stop', 'length' (max_tokens or the context's end) or 'tool_calls'
    usage: Done  # prompt / completion / reasoning tokens and the prefill and decode seconds

    @property
    def message(self) -> dict:
        """The assistant turn for the next request's messages (OpenAI style, reasoning_content included)."""
        return assistant_message(self.tool_calls + (ContentDelta(self.content), ReasoningDelta(self.reasoning)))


def collect(stream: Iterable[Event | Done]) -> Completion:
    """Run a chat stream to its end and fold it into a Completion."""
    reasoning: list[str] = []
    content: list[str] = []
    calls: list[ToolCall] = []
    errors: list[ToolCallError] = []
    done = None
    for ev in stream:
        if isinstance(ev, ReasoningDelta):
            reasoning.append(ev.text)
        elif isinstance(ev, ContentDelta):
            content.append(ev.text)
        elif isinstance(ev, ToolCall):
            calls.append(ev)
        elif isinstance(ev, ToolCallError):
            errors.append(ev)
        elif isinstance(ev, Done):
            done = ev
    if done is None:  # run_chat always ends with Done; a stream without one was cut short
        raise RuntimeError("the chat stream ended without its Done event")
    return Completion("".join(content), "".join(reasoning), tuple(calls), tuple(errors), done.finish_reason, done)
