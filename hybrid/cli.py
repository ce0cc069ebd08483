"""The `kimi-hybrid` command: the terminal face. Rendering (click, rich) lives only here.

Every user mistake becomes one clear line and a non-zero exit; `--debug` shows the traceback.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn
from rich.table import Table

from .checkpoint import CheckpointError
from .config import ConfigError, ModelConfig
from .layout import size_report
from .synth import PRESETS, GeneratorError

console = Console()
err_console = Console(stderr=True)
USER_ERRORS = (CheckpointError, ConfigError, GeneratorError, ValueError, OSError)


class Cli(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if ctx.params.get("debug"):
                raise
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(1)


@click.group(cls=Cli)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def main(debug: bool) -> None:
    """Run Kimi K2 Thinking on one workstation: GPU-side attention, CPU INT4 experts."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _progress_bar(label: str):
    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=err_console, transient=True)
    task = bar.add_task(label, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def resolve_with_progress(model: str) -> Path:
    from .engine import resolve_model
    from .synth import cache_dir

    if model in PRESETS and not any(cache_dir().glob(f"{model}-seed0-*/.kimi-hybrid-synthetic")):
        err_console.print(f"generating the built-in '{model}' checkpoint into {cache_dir()} (first use only)")
        bar, cb = _progress_bar(model)
        from .synth import ensure_preset

        with bar:
            return ensure_preset(model, progress=cb)
    return resolve_model(model)


@main.command()
@click.argument("preset", type=click.Choice(PRESETS))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Directory to write (default: the cache).")
@click.option("--seed", default=0, show_default=True, help="Seed for the synthetic weights.")
def generate(preset: str, out: Path | None, seed: int) -> None:
    """Write a synthetic checkpoint in the exact Kimi K2 Thinking on-disk format."""
    from .synth import ensure_preset, preset_config, write_checkpoint

    bar, cb = _progress_bar(preset)
    with bar:
        if out is None:
            path = ensure_preset(preset, seed=seed, progress=cb)
        else:
            if out.exists() and any(out.iterdir()):
                raise GeneratorError(f"{out} exists and is not empty; choose a new directory (nothing was overwritten)")
            path = write_checkpoint(out, preset_config(preset), seed=seed, sparse=(preset == "k2-full-sparse"), progress=cb)
    console.print(f"wrote {path}")


@main.command()
@click.option("--model", "-m", default="k2-full-sparse", show_default=True,
              help="Checkpoint directory, preset name, or a config.json file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(model: str, as_json: bool) -> None:
    """Model size from its config: parameters (total, active per token) and bytes on disk."""
    p = Path(model)
    n_tensors = None
    if p.is_file():
        cfg = ModelConfig.from_file(p)
    else:
        from .checkpoint import Checkpoint

        ckpt = Checkpoint(resolve_with_progress(model))
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
    t.add_row("parameters", f"{r.total_params / 1e9:,.1f} B total, {r.active_params / 1e9:,.1f} B active per token")
    t.add_row("on disk", f"{r.disk_bytes / 1e9:,.1f} GB ({r.routed_expert_bytes / 1e9:,.1f} GB routed experts, INT4)")
    t.add_row("expert bytes per token", f"{r.expert_bytes_per_token / 1e9:,.2f} GB")
    if n_tensors is not None:
        t.add_row("tensors", f"{n_tensors:,} (validated)")
    console.print(t)


@main.command()
@click.argument("prompt")
@click.option("--model", "-m", default="tiny", show_default=True, help="Checkpoint directory or preset name.")
@click.option("--max-tokens", default=64, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", default=1.0, show_default=True, help="0 = greedy; 1.0 is Moonshot's recommendation.")
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--hide-thinking", is_flag=True, help="Do not print the reasoning.")
def run(prompt: str, model: str, max_tokens: int, temperature: float, seed: int | None, hide_thinking: bool) -> None:
    """Answer one prompt: reasoning dim, content plain, tool calls as blocks, then speed."""
    from . import load
    from .conversation import Done
    from .parser import ContentDelta, ReasoningDelta, ToolCall, ToolCallError

    engine = load(resolve_with_progress(model))
    for ev in engine.chat([{"role": "user", "content": prompt}], temperature=temperature, seed=seed, max_tokens=max_tokens):
        if isinstance(ev, ReasoningDelta) and not hide_thinking:
            console.print(ev.text, style="dim", end="", markup=False, highlight=False)
        elif isinstance(ev, ContentDelta):
            console.print(ev.text, end="", markup=False, highlight=False)
        elif isinstance(ev, ToolCall):
            console.print(f"\n[bold]tool call[/] {ev.name} {ev.arguments}", highlight=False)
        elif isinstance(ev, ToolCallError):
            console.print(f"\n[red]malformed tool call[/] ({ev.reason}): {ev.raw!r}", highlight=False)
        elif isinstance(ev, Done):
            pre = ev.prefill_tokens / ev.prefill_s if ev.prefill_s else 0.0
            dec = (ev.completion_tokens - 1) / ev.decode_s if ev.decode_s else 0.0
            err_console.print(f"\n[{ev.finish_reason}] prompt {ev.prompt_tokens} tokens, {pre:.1f} tok/s prefill; "
                              f"{ev.completion_tokens} generated, {dec:.1f} tok/s decode", style="cyan", highlight=False, markup=False)


@main.command()
@click.option("--kernels", is_flag=True, help="Benchmark the CPU expert kernels on Kimi K2 shapes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--small", is_flag=True, help="Tiny shapes (a smoke run, seconds).")
@click.option("--threads", type=int, help="CPU threads (default: all).")
def bench(kernels: bool, as_json: bool, small: bool, threads: int | None) -> None:
    """Measure speed and print figures."""
    if not kernels:
        raise click.UsageError("only --kernels is available so far: kimi-hybrid bench --kernels [--json]")
    try:
        from .kernel_bench import run_kernel_bench
    except ImportError as e:  # the benchmark module is its own piece of work (issue 3)
        raise click.ClickException(f"the kernel benchmark is not available in this build ({e})") from None
    result = run_kernel_bench(small=small, threads=threads)
    if as_json:
        click.echo(json.dumps(result))
        return
    t = Table(title="CPU expert kernels")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in _flatten(result):
        t.add_row(k, f"{v:,.2f}" if isinstance(v, float) else str(v))
    console.print(t)


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
