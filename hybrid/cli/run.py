"""`kimi-hybrid run PROMPT`: one answer, for a person or a script.

On a terminal the turn streams as in chat (reasoning dim, then the answer, then the speed line). With stdout
piped, stdout gets the answer's text alone and everything else (reasoning, tool-call blocks, the speed line)
goes to stderr; `--json` prints one object instead: answer, reasoning, tool calls, usage.
"""
from __future__ import annotations

import json
from typing import Any

import click

from hybrid.cli.chat_ui import Turn, speeds, status_line
from hybrid.cli.common import SEED, FiniteFloat, console, engine_options, err_console, model_option, resolve_model, start_engine
from hybrid.text.conversation import Done
from hybrid.text.parser import ContentDelta


def completion_json(c: Any) -> dict[str, Any]:
    """A runtime Completion as the `--json` object (the same field names as the OpenAI usage block)."""
    u = c.usage
    pre, dec = speeds(u)
    return {
        "content": c.content, "reasoning": c.reasoning, "finish_reason": c.finish_reason,
        "tool_calls": [{"id": t.id, "name": t.name, "arguments": t.arguments} for t in c.tool_calls],
        "tool_call_errors": [{"raw": t.raw, "reason": t.reason} for t in c.tool_call_errors],
        "usage": {"prompt_tokens": u.prompt_tokens, "cached_tokens": u.prompt_tokens - u.prefill_tokens,
                  "completion_tokens": u.completion_tokens, "reasoning_tokens": u.reasoning_tokens,
                  "prefill_s": u.prefill_s, "decode_s": u.decode_s, "prefill_tok_s": pre,
                  "decode_tok_s": dec if u.completion_tokens > 1 else None},
    }


def stream(events, context: int, show_thinking: bool) -> None:
    """Render a chat stream: all of it to the terminal, or (stdout piped) the answer's text alone to stdout."""
    piped = not console.is_terminal
    turn = Turn(err_console if piped else console, show_thinking=show_thinking, in_chat=False)
    wrote = False
    for ev in events:
        if isinstance(ev, Done):
            turn.finish()
            if piped and wrote:
                click.echo()
            err_console.print(status_line(ev, context, in_chat=False), soft_wrap=True)
        elif piped and isinstance(ev, ContentDelta):
            click.echo(ev.text, nl=False)  # as written: a script gets the model's bytes, not a rendering
            wrote = True
        else:
            turn.feed(ev)


@click.command()
@click.argument("prompt")
@model_option
@engine_options
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", type=FiniteFloat(min=0), default=1.0, show_default=True,
              help="0 = greedy; 1.0 is Moonshot's recommendation.")
@click.option("--seed", type=SEED, help="Seed for reproducible sampling.")
@click.option("--hide-thinking", is_flag=True, help="Fold the reasoning to one line.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: content, reasoning, tool calls, usage.")
def run(prompt: str, model: str, max_tokens: int, temperature: float, seed: int | None, hide_thinking: bool,
        as_json: bool, **engine_opts) -> None:
    """Answer one prompt: reasoning dim, content plain, tool calls as blocks, then speed. Piped, stdout holds
    only the answer (the rest goes to stderr)."""
    engine = start_engine(resolve_model(model), model, **engine_opts)
    messages = [{"role": "user", "content": prompt}]
    sampling = {"temperature": temperature, "seed": seed, "max_tokens": max_tokens}
    if as_json:
        click.echo(json.dumps(completion_json(engine.complete(messages, **sampling)), ensure_ascii=False))
    else:
        stream(engine.chat(messages, **sampling), engine.context, not hide_thinking)
