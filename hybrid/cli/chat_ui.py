"""Rendering one assistant turn in the terminal: reasoning dim (or folded to one line), content as plain
text, tool calls as structured blocks, and the status line with prefill / decode speed.

Owns what the user sees of parser events and Done records, and collects the turn into an OpenAI-format
assistant message (content, reasoning_content, tool_calls). Must not run the model or read input.
"""
from __future__ import annotations

import json
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.syntax import Syntax
from rich.text import Text

from hybrid.text.conversation import Done
from hybrid.text.parser import ContentDelta, Event, ReasoningDelta, ToolCall, ToolCallError


# control characters from the model (a stray \r, an escape sequence) must not move the cursor or
# restyle the terminal: show them as their Unicode control pictures (U+2400..U+2421)
_VISIBLE = {c: 0x2400 + c for c in range(32) if c not in (9, 10)} | {127: 0x2421}


def visible(text: str) -> str:
    return text.translate(_VISIBLE)


class Turn:
    """Feed one turn's events; it streams them to `console` and keeps the text for the history."""

    def __init__(self, console: Console, show_thinking: bool = True):
        self.console = console
        self.show_thinking = show_thinking
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self._mode: str | None = None  # 'reasoning' | 'content' | 'block': what was printed last
        self._folded = False  # the one-line "thinking..." placeholder is on screen

    def feed(self, ev: Event) -> None:
        if isinstance(ev, ReasoningDelta):
            self.reasoning.append(ev.text)
            if self.show_thinking:
                self._switch("reasoning")
                self.console.print(visible(ev.text), style="dim", end="", markup=False, highlight=False)
            elif not self._folded:
                self._switch("reasoning")
                self.console.print("thinking... (/think on shows it live)", style="dim italic", end="")
                self._folded = True
        elif isinstance(ev, ContentDelta):
            self._switch("content")
            self.console.print(visible(ev.text), end="", markup=False, highlight=False)
        elif isinstance(ev, ToolCall):
            self.tool_calls.append(ev)
            self._switch("block")
            self.console.print(tool_call_block(ev))
        elif isinstance(ev, ToolCallError):
            self._switch("block")
            self.console.print(Panel(Text(visible(ev.raw)), title=f"malformed tool call: {ev.reason}", border_style="red",
                                     title_align="left"))

    def _switch(self, mode: str) -> None:
        """Separate reasoning, content and blocks; replace the folded placeholder with its summary."""
        if mode == self._mode:
            return
        if self._folded:
            self._fold_summary()
        elif self._mode in ("reasoning", "content") and mode != self._mode:
            self.console.print("\n" if mode == "content" else "")
        self._mode = mode

    def _fold_summary(self) -> None:
        text = "".join(self.reasoning)
        erase = "\r\x1b[2K" if self.console.is_terminal else "\n"
        self.console.file.write(erase)
        self.console.print(f"[thought: {len(text.split()):,} words, hidden; /think shows it]", style="dim",
                           highlight=False, markup=False)
        self._folded = False

    def finish(self) -> None:
        """End the turn's output on a fresh line."""
        if self._folded:
            self._fold_summary()
        elif self._mode in ("reasoning", "content"):
            self.console.print()
        self._mode = None

    def message(self) -> dict[str, Any]:
        """The turn as an OpenAI-format assistant message."""
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.reasoning:
            msg["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in self.tool_calls]
        return msg


def tool_call_block(call: ToolCall) -> Panel:
    try:
        body: Any = Syntax(json.dumps(json.loads(call.arguments), indent=2, ensure_ascii=False), "json",
                           theme="ansi_dark", background_color="default")
    except ValueError:
        body = Text(visible(call.arguments))
    return Panel(Group(body), title=f"tool call: {visible(call.name)}", subtitle=call.id, title_align="left",
                 subtitle_align="right", border_style="yellow")


def speeds(done: Done) -> tuple[float, float]:
    """(prefill tok/s over the tokens computed, decode tok/s over the tokens after the first)."""
    pre = done.prefill_tokens / done.prefill_s if done.prefill_s > 0 else 0.0
    dec = (done.completion_tokens - 1) / done.decode_s if done.decode_s > 0 else 0.0
    return pre, dec


def status_line(done: Done) -> Text:
    """One line: why it stopped, prompt tokens (reused from the KV cache) and both speeds."""
    pre, dec = speeds(done)
    reused = done.prompt_tokens - done.prefill_tokens
    cached = f" ({reused:,} cached)" if reused > 0 else ""
    decode = f"decode {dec:,.1f} tok/s" if done.completion_tokens > 1 else "no decode step"  # token 1: prefill
    return Text(f"[{done.finish_reason}] prompt {done.prompt_tokens:,} tokens{cached}, prefill {pre:,.1f} tok/s | "
                f"{done.completion_tokens:,} generated ({done.reasoning_tokens:,} thinking), {decode}",
                style="cyan")
