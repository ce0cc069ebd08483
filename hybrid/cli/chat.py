"""`kimi-hybrid chat`: an interactive conversation in the terminal.

Owns the read-eval loop: multi-line input, slash commands, the OpenAI-format history (saved and loaded
as JSON with reasoning_content), Ctrl-C handling (the first stops generation at the next token and the
partial answer is kept or dropped; a second one stops at once) and Ctrl-D to leave. Rendering of a
turn is chat_ui.py; the model is driven only through Engine.chat.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.text import Text

from hybrid.cli.chat_ui import Turn, speeds, status_line, visible
from hybrid.cli.common import (SEED, USER_ERRORS, FiniteFloat, UserError, console, engine_options, err_console,
                               model_option, resolve_model, start_engine, user_message)
from hybrid.text.conversation import Done, check_message, check_tools, template_role

if TYPE_CHECKING:
    from hybrid.runtime.engine import Engine

HELP = """commands:
  /help              this list
  /reset             forget the conversation (the system prompt stays)
  /system [TEXT]     set the system prompt (no text: show it)
  /save FILE         save the conversation as OpenAI-format JSON (with reasoning_content)
  /load FILE         load a conversation saved by /save (or any OpenAI messages JSON)
  /think on|off      show the reasoning live, or fold it to one line; /think alone shows the last one
  /tool TEXT         answer the model's pending tool call with TEXT
  /stats             speed and where the time went, this session
  /exit              leave (Ctrl-D too)
input: end a line with \\ to continue it; a line with just \"\"\" starts and ends a block.
Ctrl-C while the model writes stops it (twice: at once); Ctrl-C at the prompt clears the line."""


class _CtrlC:
    """While generating: the first Ctrl-C sets a flag (stop at the next token), a second raises."""

    def __enter__(self) -> "_CtrlC":
        self.hits = 0
        self._old = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        self.hits += 1
        if self.hits > 1:
            raise KeyboardInterrupt
        err_console.print("\n[stopping...]", style="yellow", highlight=False, markup=False)

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._old)


def read_message(first_prompt: str = ">>> ", more: str = "... ") -> str:
    """One user message; raises EOFError on Ctrl-D and KeyboardInterrupt on Ctrl-C."""
    line = input(first_prompt)
    if line.strip() == '"""':
        lines = []
        while (line := input(more)).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(input(more))
    return "\n".join(lines)


def validate_messages(data: Any, source: str) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) from a saved conversation: {"messages": [...], "tools": [...]} or a bare list.
    Every message and tool is checked here, so a bad file is one error naming it, not a failure per turn."""
    tools = None
    if isinstance(data, dict):
        tools = data.get("tools")
        data = data.get("messages")
    if not isinstance(data, list):
        raise UserError(f"{source}: expected a JSON list of messages or an object with \"messages\"")
    for i, m in enumerate(data):
        _check_message(m, f"{source}: message {i}")
    return data, (None if tools is None else validate_tools(tools, source))


def _check_message(m: Any, where: str) -> None:
    try:
        check_message(m, where)
    except ValueError as e:
        raise UserError(str(e)) from None


def validate_tools(tools: Any, source: str) -> list[dict]:
    """OpenAI-format tool definitions (conversation.check_tools), the error naming the file and the index."""
    try:
        check_tools(tools, source, lambda i: f"{source}: tool {i}")
    except ValueError as e:
        raise UserError(str(e)) from None
    return tools


def read_json(name: str) -> Any:
    """A JSON file the user named, every failure (missing, a folder, unreadable, not JSON) one plain sentence."""
    path = Path(name).expanduser()
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{name} is a folder; name a JSON file") from None
    except PermissionError:
        raise UserError(f"{name}: permission denied") from None
    except UnicodeDecodeError:
        raise UserError(f"{name} is not a text file") from None
    except ValueError as e:
        raise UserError(f"{name} is not valid JSON ({e})") from None


def counted(messages: list[dict]) -> str:
    """'5 messages (system prompt and 4 more)': /save and /load count the same things the same way."""
    n = len(messages)
    head = f"{n} message{'s' if n != 1 else ''}"
    if messages and template_role(messages[0]["role"]) == "system":
        return f"{head} (system prompt and {n - 1} more)"
    return head


class ChatSession:
    def __init__(self, engine: Engine, sampling: dict, *, system: str | None, show_thinking: bool, on_interrupt: str,
                 tools: list[dict] | None):
        self.engine, self.sampling = engine, sampling
        self.system, self.show_thinking, self.on_interrupt, self.tools = system, show_thinking, on_interrupt, tools
        self.messages: list[dict] = []  # without the system prompt
        self.last_reasoning = ""
        self.turns, self.interrupted, self.generated, self.last_done = 0, 0, 0, None
        engine.reset_stats()

    def request(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    # ---- one turn ---------------------------------------------------------------------
    def respond(self) -> None:
        """Generate the assistant's answer to the history; Ctrl-C keeps or drops the partial answer."""
        turn = Turn(console, self.show_thinking)
        done: Done | None = None
        before, t0, first = self.engine.stats()["tokens"], time.perf_counter(), None
        gen = self.engine.chat(self.request(), tools=self.tools, **self.sampling)
        with _CtrlC() as ctrl_c:
            try:
                for ev in gen:
                    first = first or time.perf_counter()
                    if isinstance(ev, Done):
                        done = ev
                    else:
                        turn.feed(ev)
                    if ctrl_c.hits:
                        break
            except KeyboardInterrupt:
                pass
            finally:
                gen.close()  # stops generation; the engine stays consistent
        turn.finish()
        self.last_reasoning = "".join(turn.reasoning)
        if done is not None:
            self.messages.append(turn.message())
            self.turns, self.generated, self.last_done = self.turns + 1, self.generated + done.completion_tokens, done
            console.print(status_line(done, self.engine.context), soft_wrap=True)
            if done.finish_reason == "tool_calls":
                console.print("(answer the tool call with /tool TEXT, or just write)", style="dim", highlight=False)
            return
        self._interrupted_speed(before, t0, first)
        if self._keep_partial():
            self.messages.append(turn.message())
            console.print("[interrupted; the partial answer is kept]", style="yellow", markup=False)
        else:
            while self.messages and self.messages[-1]["role"] != "assistant":
                self.messages.pop()  # the unanswered user message (or tool result) goes too
            console.print("[interrupted; the turn is dropped]", style="yellow", markup=False)

    def _interrupted_speed(self, before: dict, t0: float, first: float | None) -> None:
        """The speed line of a turn Ctrl-C stopped, from the engine's token counts since `before` and the wall
        clock (t0: the request, first: its first event, about the first token); counted in /stats."""
        after, end = self.engine.stats()["tokens"], time.perf_counter()
        pre, dec = after["prefill"] - before["prefill"], after["decode"] - before["decode"]
        made = dec + 1 if first is not None else 0  # the first token comes out of the prefill
        self.interrupted, self.generated = self.interrupted + 1, self.generated + made
        first = first or end
        pre_speed = f"prefill {pre / (first - t0):,.1f} tok/s" if pre and first > t0 else "prefill stopped"
        decode = f"decode {dec / (end - first):,.1f} tok/s" if dec and end > first else "no decode step"
        console.print(Text(f"[interrupted] {pre:,} prompt tokens computed, {pre_speed} | {made:,} generated, {decode}",
                           style="cyan"), soft_wrap=True)

    def _keep_partial(self) -> bool:
        if self.on_interrupt != "ask":
            return self.on_interrupt == "keep"
        try:
            return input("keep the partial answer in the conversation? [y/N] ").strip().lower() in ("y", "yes")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return False

    def say(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        self._guarded(self.respond, undo=True)

    def _guarded(self, action, undo: bool = False) -> None:
        """A mistake inside the session (too long a prompt, a bad file) is one line, not the end."""
        n = len(self.messages)
        try:
            action()
        except USER_ERRORS as e:
            err_console.print(f"error: {user_message(e)}", style="red", highlight=False, markup=False)
            if undo:
                del self.messages[n - 1:]

    # ---- slash commands ----------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("exit", "quit"):
            return False
        handler = getattr(self, f"cmd_{name}", None)
        if handler is None:
            err_console.print(f"unknown command /{name}; /help lists them", style="red", highlight=False, markup=False)
        else:
            self._guarded(lambda: handler(arg))
        return True

    def cmd_help(self, arg: str) -> None:
        console.print(HELP, highlight=False, markup=False)

    def cmd_reset(self, arg: str) -> None:
        self.messages, self.last_reasoning, self.last_done = [], "", None
        console.print("conversation cleared" + (" (system prompt kept)" if self.system else ""), style="dim")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            console.print(f"system prompt: {self.system or '(none: the chat template default)'}", highlight=False,
                          markup=False)
            return
        self.system = arg
        console.print("system prompt set", style="dim")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise UserError("/save needs a file name")
        data: dict[str, Any] = {"messages": self.request()}
        if self.tools:
            data["tools"] = self.tools
        Path(arg).expanduser().write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        console.print(f"saved {counted(data['messages'])} to {arg}", style="dim", highlight=False)

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise UserError("/load needs a file name")
        data = read_json(arg)
        messages, tools = validate_messages(data, arg)
        how_many = counted(messages)  # as /save counted them: the system prompt is one
        if messages and template_role(messages[0]["role"]) == "system":
            self.system, messages = messages[0].get("content") or None, messages[1:]
        self.messages, self.tools, self.last_done = list(messages), tools if tools is not None else self.tools, None
        console.print(f"loaded {how_many} from {arg}", style="dim", highlight=False)
        for m in messages[-2:]:
            text = m.get("content") if isinstance(m.get("content"), str) else json.dumps(m.get("content"))
            console.print(f"  {m['role']}: {visible(text or '')[:200]}", style="dim", highlight=False, markup=False)

    def cmd_think(self, arg: str) -> None:
        if arg in ("on", "off"):
            self.show_thinking = arg == "on"
            console.print(f"reasoning {'shown live' if self.show_thinking else 'folded to one line'}", style="dim")
        elif not arg:
            console.print(visible(self.last_reasoning) or "(no reasoning yet)", style="dim", highlight=False, markup=False)
        else:
            raise UserError("/think takes on, off, or nothing (show the last reasoning)")

    def cmd_tool(self, arg: str) -> None:
        answered = {m.get("tool_call_id") for m in self.messages if m["role"] == "tool"}
        last = next((m for m in reversed(self.messages) if m["role"] == "assistant"), {})
        pending = [c["id"] for c in last.get("tool_calls", []) if c["id"] not in answered]
        if not pending:
            raise UserError("no tool call is waiting for an answer")
        self.messages.append({"role": "tool", "tool_call_id": pending[0], "content": arg})
        if len(pending) == 1:
            self.respond()
        else:
            console.print(f"{len(pending) - 1} more tool call(s) to answer", style="dim")

    def conversation_tokens(self) -> int:
        """Tokens the conversation takes now (the next request's prompt, before the new message)."""
        if not self.messages:
            return 0
        request = [dict(m, role=template_role(m["role"])) for m in self.request()]
        return len(self.engine.chat_prompt(request, self.tools))

    def cmd_stats(self, arg: str) -> None:
        stopped = f" ({self.interrupted} interrupted)" if self.interrupted else ""
        console.print(f"{self.turns} answers{stopped}, {self.generated:,} tokens generated", highlight=False)
        if self.last_done is not None:
            d = self.last_done
            pre, dec = speeds(d)
            decode = f"decode {dec:,.1f} tok/s" if d.completion_tokens > 1 else "no decode step"
            console.print(f"last answer: prefill {pre:,.1f} tok/s, {decode}", highlight=False)
        console.print(f"the conversation takes {self.conversation_tokens():,} of the {self.engine.context:,} context "
                      "tokens", highlight=False)
        stats = self.engine.stats()
        n = max(1, sum(stats["tokens"].values()))
        parts = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {1e3 * stats[k] / n:.2f}"
                          for k in ("gpu_side_s", "experts_compute_s", "experts_wait_s", "io_wait_s", "overhead_s"))
        console.print(f"ms per token over {n:,} tokens: {parts}")
        cache = stats["cache"]
        if cache and cache["hit_rate"] is not None:
            console.print(f"expert cache hit rate {cache['hit_rate']:.1%} ({cache['hits']:,} hits, "
                          f"{cache['misses']:,} misses)")

    # ---- the loop ------------------------------------------------------------------------
    def loop(self) -> None:
        while True:
            try:
                text = read_message()
            except EOFError:
                console.print()
                return
            except KeyboardInterrupt:
                console.print("\n(Ctrl-D or /exit leaves)", style="dim")
                continue
            if not text.strip():
                continue
            if text.startswith("/") and "\n" not in text:
                if not self.command(text.strip()):
                    return
                continue
            self.say(text)


@click.command()
@model_option
@engine_options
@click.option("--system", help="System prompt (default: the chat template's own).")
@click.option("--temperature", type=FiniteFloat(min=0), default=1.0, show_default=True,
              help="Moonshot's recommendation for K2 Thinking; 0 = greedy.")
@click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off.")
@click.option("--min-p", type=FiniteFloat(0, 1), default=0.0, show_default=True, help="0 = off.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Per answer (default: until it stops or the context is full).")
@click.option("--seed", type=SEED, help="Seed for reproducible sampling.")
@click.option("--show-thinking/--hide-thinking", default=True, show_default=True,
              help="Stream the reasoning (dim), or fold it to one line.")
@click.option("--on-interrupt", type=click.Choice(["ask", "keep", "drop"]), default="ask", show_default=True,
              help="After Ctrl-C: keep or drop the partial answer, or ask.")
@click.option("--tools", "tools_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON file with OpenAI-format tool definitions.")
@click.option("--load", "load_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Start from a conversation saved with /save.")
def chat(model: str, system: str | None, temperature: float, top_p: float, top_k: int, min_p: float,
         max_tokens: int | None, seed: int | None, show_thinking: bool, on_interrupt: str, tools_file: Path | None,
         load_file: Path | None, **engine_opts: Any) -> None:
    """Chat with the model: streaming answers, reasoning dim, tool calls as blocks; /help inside."""
    import readline  # noqa: F401  (line editing and history for input())

    tools = None if tools_file is None else validate_tools(read_json(str(tools_file)), str(tools_file))
    engine = start_engine(resolve_model(model), model, **engine_opts)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, max_tokens=max_tokens)
    session = ChatSession(engine, sampling, system=system, show_thinking=show_thinking, on_interrupt=on_interrupt,
                          tools=tools)
    if load_file is not None:
        session.cmd_load(str(load_file))
    console.print(f"kimi-hybrid chat: {model}, context {engine.context:,} tokens. /help for commands, Ctrl-D to leave.",
                  style="bold", highlight=False, markup=False)
    if tools:
        names = ", ".join(visible(t["function"]["name"]) for t in tools)
        console.print(f"tools: {len(tools)} loaded from {tools_file} ({names})", style="dim", highlight=False,
                      markup=False, soft_wrap=True)
    session.loop()
