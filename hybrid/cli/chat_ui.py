"""Rendering one assistant turn in the terminal: reasoning dim (or folded to one line), content as plain
text, tool calls as structured blocks, and the status line with prefill / decode speed.

Owns what the user sees of parser events and Done records, and collects the turn into an OpenAI-format
assistant message (content, reasoning_content, tool_calls). Must not run the model or read input.
"""
from __future__ import annotations

import json
import time
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

    def __init__(self, console: Console, show_thinking: bool = True, in_chat: bool = True):
        self.console = console
        self.show_thinking = show_thinking
        self.in_chat = in_chat  # the hints name chat's /think; run's do not
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self._mode: str | None = None  # 'reasoning' | 'content' | 'block': what was printed last
        self._folded = False  # the one-line "thinking..." placeholder is on screen
        self._fold_start = self._fold_drawn = 0.0  # when the hidden reasoning began, when its line was last drawn
        self._fold_tokens = 0  # reasoning deltas while folded: one per generated token

    def feed(self, ev: Event) -> None:
        if isinstance(ev, ReasoningDelta):
            self.reasoning.append(ev.text)
            if self.show_thinking:
                self._switch("reasoning")
                self.console.print(visible(ev.text), style="dim", end="", markup=False, highlight=False)
            elif not self._folded:
                self._switch("reasoning")
                self._folded, self._fold_tokens = True, 1
                self._fold_start = self._fold_drawn = time.perf_counter()
                self.console.print(self._fold_line(0.0), style="dim italic", end="", highlight=False)
            else:
                self._fold_tokens += 1
                self._redraw_fold()
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

    def _fold_line(self, elapsed: float) -> str:
        hint = " (/think on shows it live)" if self.in_chat else ""
        if elapsed <= 0:
            return f"thinking...{hint}"
        n = self._fold_tokens
        return f"thinking... {n:,} tokens, {elapsed:,.1f} s, {n / elapsed:,.1f} tok/s{hint}"

    def _redraw_fold(self) -> None:
        """On a terminal, the placeholder counts live: tokens, seconds, tok/s (redrawn at most 10 times a second)."""
        now = time.perf_counter()
        if not self.console.is_terminal or now - self._fold_drawn < 0.1:
            return
        self._fold_drawn = now
        self.console.file.write("\r\x1b[2K")
        self.console.print(self._fold_line(now - self._fold_start), style="dim italic", end="", highlight=False)

    def _fold_summary(self) -> None:
        text = "".join(self.reasoning)
        erase = "\r\x1b[2K" if self.console.is_terminal else "\n"
        self.console.file.write(erase)
        shows = "; /think shows it" if self.in_chat else ""
        self.console.print(f"[thought: {len(text.split()):,} words, hidden{shows}]", style="dim",
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


def why_stopped(done: Done, context: int | None = None, in_chat: bool = True) -> str:
    """finish_reason in words: the answer ended, a tool call, the --max-tokens cap, or a full context."""
    if done.finish_reason == "stop":
        return "finished"
    if done.finish_reason == "tool_calls":
        return "tool call"
    if context is not None and done.prompt_tokens + done.completion_tokens >= context:
        return f"context full ({context:,} tokens): raise --context" + (" or /reset" if in_chat else "")
    return "cut at --max-tokens"


def status_line(done: Done, context: int | None = None, in_chat: bool = True) -> Text:
    """One line: why it stopped, prompt tokens (reused from the KV cache) and both speeds."""
    pre, dec = speeds(done)
    reused = done.prompt_tokens - done.prefill_tokens
    cached = f" ({reused:,} cached)" if reused > 0 else ""
    decode = f"decode {dec:,.1f} tok/s" if done.completion_tokens > 1 else "no decode step"  # token 1: prefill
    return Text(f"[{why_stopped(done, context, in_chat)}] prompt {done.prompt_tokens:,} tokens{cached}, prefill "
                f"{pre:,.1f} tok/s | {done.completion_tokens:,} generated ({done.reasoning_tokens:,} thinking), {decode}",
                style="cyan")
