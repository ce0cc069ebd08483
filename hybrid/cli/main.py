"""The `kimi-hybrid` command: the terminal face. Rendering (click, rich) lives only in the cli* modules.

This file holds the group (every user mistake becomes one clear line and exit 1; `--debug` shows the
traceback; `--version`) and the small commands: generate, info, serve. run, chat, bench, plan and doctor live
in their own files.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from hybrid.cli.bench import bench
from hybrid.cli.chat import chat
from hybrid.cli.common import (DEFAULT_MODEL, MODEL_HELP, SEED, USER_ERRORS, FiniteFloat, console, engine_options,
                               engine_options_with, err_console, model_option, progress_bar, resolve_model,
                               user_message)
from hybrid.cli.doctor import doctor
from hybrid.cli.node import node
from hybrid.cli.plan import plan
from hybrid.cli.run import run
from hybrid.cli.split import split
from hybrid.checkpoint.config import ModelConfig
from hybrid.checkpoint.layout import size_report
from hybrid.serve.limits import DEFAULT_KEEPALIVE_S, DEFAULT_MAX_QUEUE, SERVE_CONTEXT_HELP  # not app/runner: FastAPI, torch
from hybrid.synth.writer import PRESETS, GeneratorError


class Cli(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if ctx.params.get("debug"):
                raise
            err_console.print(Text.assemble(("error: ", "bold red"), user_message(e)), highlight=False, soft_wrap=True)
            sys.exit(1)


@click.group(cls=Cli)
@click.version_option(package_name="kimi-hybrid", prog_name="kimi-hybrid")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def main(debug: bool) -> None:
    """Run Kimi K2 Thinking on one workstation: GPU-side attention, CPU INT4 experts."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("preset", type=click.Choice(PRESETS))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Directory to write (default: the cache).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for the synthetic weights.")
def generate(preset: str, out: Path | None, seed: int) -> None:
    """Write a synthetic checkpoint in the exact Kimi K2 Thinking on-disk format."""
    from hybrid.synth.writer import ensure_preset, preset_config, write_checkpoint

    bar, cb = progress_bar(preset)
    with bar:
        if out is None:
            path = ensure_preset(preset, seed=seed, progress=cb)
        else:
            if out.exists() and any(out.iterdir()):
                raise GeneratorError(f"{out} exists and is not empty; choose a new directory (nothing was overwritten)")
            path = write_checkpoint(out, preset_config(preset), seed=seed, sparse=(preset == "k2-full-sparse"), progress=cb)
    console.print(f"wrote {path}")


@main.command()
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help=f"{MODEL_HELP.removesuffix('.')}, or a config.json file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(model: str, as_json: bool) -> None:
    """Model size from its config: parameters (total, active per token) and bytes on disk."""
    p = Path(model)
    n_tensors = None
    if p.is_file():
        cfg = ModelConfig.from_file(p)
    else:
        from hybrid.checkpoint.reader import Checkpoint

        path = resolve_model(model)
        with err_console.status(f"validating {model}: every tensor's header, dtype and shape..."):
            ckpt = Checkpoint(path)
        cfg, n_tensors = ckpt.config, len(ckpt.tensors)
    r = size_report(cfg)
    out = {
        "model_type": cfg.model_type, "layers": cfg.num_hidden_layers, "moe_layers": len(cfg.moe_layers),
        "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
        "total_params": r.total_params, "active_params": r.active_params, "routed_expert_params": r.routed_expert_params,
        "disk_bytes": r.disk_bytes, "routed_expert_bytes": r.routed_expert_bytes,
        "expert_bytes_per_token": r.expert_bytes_per_token, "tensors": n_tensors,
    }
    if as_json:
        click.echo(json.dumps(out))
        return
    t = Table(title=f"{model}", show_header=False)
    t.add_row("architecture", f"{cfg.model_type}: {cfg.num_hidden_layers} layers ({len(cfg.moe_layers)} MoE), "
                              f"{cfg.n_routed_experts} routed experts, top-{cfg.num_experts_per_tok}")
    t.add_row("parameters", f"{count(r.total_params)} total, {count(r.active_params)} active per token")
    t.add_row("on disk", f"{nbytes(r.disk_bytes)} ({nbytes(r.routed_expert_bytes)} routed experts, INT4)")
    t.add_row("expert bytes per token", nbytes(r.expert_bytes_per_token))
    if n_tensors is not None:
        t.add_row("tensors", f"{n_tensors:,} (validated)")
    console.print(t)


def _scaled(n: float, units: tuple[str, ...], sep: str) -> str:
    """n in the largest SI unit (steps of 1000) that keeps it >= 1, to 3 significant figures."""
    k = 0
    while k + 1 < len(units) and abs(n) >= 1000 ** (k + 1):
        k += 1
    v = n / 1000 ** k
    digits = 0 if k == 0 or v >= 100 else 1 if v >= 10 else 2
    return f"{v:,.{digits}f}{sep}{units[k]}".rstrip()


def count(n: float) -> str:
    """Parameters: 412 / 1.18 M / 32.9 B / 1.03 T."""
    return _scaled(n, ("", "K", "M", "B", "T"), " ")


def nbytes(n: float) -> str:
    """Bytes (GB = 10^9, as everywhere here): 512 B / 1.31 MB / 594 GB."""
    return _scaled(n, ("B", "KB", "MB", "GB", "TB"), " ")


@main.command()
@model_option
@engine_options_with(context=SERVE_CONTEXT_HELP)  # a server keeps 32K where it fits (serve.app.serve_context)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="KIMI_HYBRID_API_KEY", help="Require this key on every request [env KIMI_HYBRID_API_KEY].")
@click.option("--model-name", default="kimi-k2-thinking", show_default=True, help="The model name clients ask for.")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1), help="Refuse longer prompts (default: the context).")
@click.option("--max-queue", type=click.IntRange(min=0), default=DEFAULT_MAX_QUEUE, show_default=True,
              help="Requests that may wait behind the running one; more get HTTP 429 with Retry-After.")
@click.option("--keepalive", "keepalive_s", type=FiniteFloat(min=0, min_open=True), default=DEFAULT_KEEPALIVE_S,
              show_default=True, help="Seconds a streamed answer may stay silent (queued, a long prefill) before an "
              "SSE comment keeps the connection open.")
@click.option("--max-body-bytes", type=click.IntRange(min=1),
              help="Refuse larger request bodies with HTTP 413 [default: 32 MiB].")
@click.option("--max-pending-bytes", type=click.IntRange(min=1),
              help="Request bytes that requests may hold at once while they are read and tokenized; one that "
              "would pass it gets HTTP 429 (memory use is a few times this) [default: 64 MiB].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True)
def serve(model: str, host: str, port: int, api_key: str | None, model_name: str, max_prompt_tokens: int | None,
          max_queue: int, keepalive_s: float, max_body_bytes: int | None, max_pending_bytes: int | None, log_level: str,
          **engine_opts) -> None:
    """Serve the model over OpenAI- and Anthropic-compatible HTTP APIs until SIGTERM or Ctrl-C, which end
    every request gracefully (see README: Serve)."""
    from hybrid.serve.app import serve as run_server

    limits = {"max_body_bytes": max_body_bytes, "max_pending_bytes": max_pending_bytes}
    options = {k: v for k, v in {**engine_opts, **limits}.items() if v is not None}  # serve() keeps its own defaults
    run_server(str(resolve_model(model)), host=host, port=port, api_key=api_key, model_name=model_name,
               max_prompt_tokens=max_prompt_tokens, max_queue=max_queue, keepalive_s=keepalive_s,
               log_level=log_level, **options)


for command in (run, chat, bench, plan, node, split, doctor):
    main.add_command(command)


if __name__ == "__main__":
    main()
