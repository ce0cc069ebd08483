"""What every `kimi-hybrid` command shares: the consoles, the user-error types, numeric option types that
refuse inf and nan, `--model` resolution (hybrid.runtime.resolve: checkpoint directory, a Hugging Face repo id
already in the local HF cache, or a built-in preset, here with a progress bar on its first generation)
and the engine-loading flags, built from hybrid.load's option specs (hybrid.runtime.options).

Never downloads anything: a model that is not here is an error that prints the command that fetches it.
Every command that runs a model has the same default (DEFAULT_MODEL: the real one) through model_option, but
bench (k2-slice, on purpose: a benchmark needs real shapes on any machine).
"""
from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

from hybrid.runtime import resolve
from hybrid.text.template import ChatTemplateError
from hybrid.checkpoint.files import CheckpointError
from hybrid.checkpoint.config import ConfigError
from hybrid.runtime.context import DEFAULT_HELP as CONTEXT_HELP
from hybrid.runtime.options import FLAGS, SPECS, LoadOptions
from hybrid.runtime.resolve import REAL_MODEL
from hybrid.checkpoint.paths import cache_dir
from hybrid.cli.warmup import load_with_progress
from hybrid.synth.writer import PRESETS, GeneratorError, is_generated, preset_makers, preset_path
from hybrid.text.tokenizer import TokenizerError

console = Console(highlight=False)  # no automatic colouring of numbers and brackets in model text
err_console = Console(stderr=True, highlight=False)


class UserError(Exception):
    """A mistake the user can fix; the message says how."""


USER_ERRORS = (UserError, CheckpointError, ConfigError, GeneratorError, TokenizerError, ChatTemplateError,
               ValueError, OSError, MemoryError, OverflowError)


def user_message(e: BaseException) -> str:
    """One line for a USER_ERRORS exception (MemoryError and OverflowError say little by themselves)."""
    if isinstance(e, MemoryError):
        if "--" in str(e):  # the raiser already named the option to change
            return f"out of memory: {e}"
        return (f"out of memory ({str(e) or 'an allocation failed'}); ask for less (--context, --ram-budget, "
                "--probe-mb) or free RAM")
    if isinstance(e, OverflowError):
        return f"a number is out of range ({e}); check the numeric options"
    return str(e)


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses inf and nan (FloatRange lets both through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v


# GB of memory (budgets up to 1 PB; a tiny model's cache takes a fraction of a MB), GB of a machine's
# RAM or GPU (10 MB to 1 PB) and GB/s (up to 100 TB/s): past these is a typo, and an unbounded float
# overflows the byte counts
GB_SIZE = FiniteFloat(min=0, min_open=True, max=1e6)
MACHINE_GB = FiniteFloat(min=0.01, max=1e6)
GBPS = FiniteFloat(min=0, min_open=True, max=1e5)
SEED = click.IntRange(0, 2**63 - 1)  # what SamplingParams and numpy's seeding take


def progress_bar(label: str) -> tuple[Progress, Callable[[int, int], None]]:
    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=err_console, transient=True)
    task = bar.add_task(label, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


# ---- --model ----------------------------------------------------------------------------------

DEFAULT_MODEL = REAL_MODEL  # one default (bench: k2-slice); when it is missing the error says how to fetch it
MODEL_HELP = f"Checkpoint directory, Hugging Face repo id in the local cache, or preset ({', '.join(PRESETS)})."


def model_option(f: Callable) -> Callable:
    """--model / -m, the same default and help on every command that runs the model."""
    return click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)(f)


def resolve_model(model: str) -> Path:
    """--model -> a checkpoint directory (hybrid.runtime.resolve, with hybrid.synth's presets); a preset's first
    generation shows a progress bar."""
    if model in PRESETS and not Path(model).expanduser().is_dir() and not is_generated(preset_path(model)):
        err_console.print(f"generating the built-in '{model}' checkpoint into {cache_dir()} (first use only)")
        bar, cb = progress_bar(model)
        with bar:
            return resolve.resolve_model(model, preset_makers(), progress=cb)
    return resolve.resolve_model(model, preset_makers())


# ---- loading an engine --------------------------------------------------------------------------

def engine_flag(name: str, **overrides: Any) -> Callable:
    """The click option --name-with-dashes for hybrid.load's keyword `name`: its type and help from the
    keyword's spec (hybrid.runtime.options), so a flag accepts what Python does; overrides (default, help,
    type) for a command whose flag says more, like plan's defaults."""
    spec = SPECS[name]
    default = DEFAULT_WORDS.get(name, DEFAULTS.get(name))
    if default is not None and spec.kind != "bool":  # the engine's default, though the flag's own stays None
        overrides = {"help": f"{spec.help} [default: {default}]", **overrides}
    if spec.kind == "choice":
        kind: click.ParamType = click.Choice([str(c) for c in spec.choices])
    elif spec.kind == "gb":
        kind = GB_SIZE  # also bounded above: past 1 PB is a typo
    elif spec.kind == "int":
        kind = click.IntRange(spec.low if spec.flag_low is None else spec.flag_low, spec.high)
    elif spec.kind == "seconds":
        kind = FiniteFloat(min=0, min_open=True, max=1e7)
    elif spec.kind == "text":
        kind = click.STRING
    elif spec.kind == "path":
        kind = click.Path(file_okay=False)
    elif spec.kind == "bool":  # a switch; absent: None, so the engine keeps its default
        return click.option(f"--{name.replace('_', '-')}", is_flag=True, default=None, help=spec.help, **overrides)
    else:
        raise TypeError(f"{name}: a {spec.kind} option has no flag type")
    return click.option(f"--{name.replace('_', '-')}", **{"type": kind, "help": spec.help, **overrides})


DEFAULTS = {f.name: f.default for f in fields(LoadOptions)}
DEFAULT_WORDS = {"context": CONTEXT_HELP}  # None in Python, decided by the plan: the default in words


def engine_options_with(**defaults: Any) -> Callable[[Callable], Callable]:
    """engine_options for a command whose own default for some keywords differs from the engine's
    (serve's context): their help says that default instead."""
    def decorate(f: Callable) -> Callable:
        for name in reversed(FLAGS):
            over = {"help": f"{SPECS[name].help} [default: {defaults[name]}]"} if name in defaults else {}
            f = engine_flag(name, **over)(f)
        return f
    return decorate


def engine_options(f: Callable) -> Callable:
    """The flags of hybrid.load(), for commands that run the model: one per keyword its spec marks a flag."""
    return engine_options_with()(f)


def load_engine(path: Path, **options: Any):
    """hybrid.runtime.loader.load (a resolved directory) with only the options the user gave (the rest keep
    the engine's defaults)."""
    from hybrid.runtime.loader import load  # torch and Numba: only once a command loads a model

    return load(path, **{k: v for k, v in options.items() if k in FLAGS and v is not None})


def start_engine(path: Path, model: str, **options: Any):
    """load_engine with a spinner for each wait (loading, then the kernels' first compile, which a warm-up run
    before the first prompt keeps out of every tok/s figure); for the commands that answer prompts."""
    return load_with_progress(lambda: load_engine(path, **options), model, err_console)
