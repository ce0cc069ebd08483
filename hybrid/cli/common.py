"""What every `kimi-hybrid` command shares: the consoles, the user-error types, numeric option types that
refuse inf and nan, `--model` resolution (hybrid.runtime.resolve: checkpoint directory, a Hugging Face repo id
already in the local HF cache, or a built-in preset, here with a progress bar on its first generation)
and the engine-loading options.

Never downloads anything: a model that is not here is an error that prints the command that fetches it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

from hybrid.runtime import resolve
from hybrid.text.template import ChatTemplateError
from hybrid.checkpoint.reader import CheckpointError
from hybrid.checkpoint.config import ConfigError
from hybrid.runtime.hardware import MAX_THREADS
from hybrid.runtime.resolve import REAL_MODEL
from hybrid.synth.writer import PRESETS, GeneratorError, cache_dir, is_generated, preset_path
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

def resolve_model(model: str) -> Path:
    """--model -> a checkpoint directory (hybrid.runtime.resolve); a preset's first generation shows a progress bar."""
    if model in PRESETS and not Path(model).expanduser().is_dir() and not is_generated(preset_path(model)):
        err_console.print(f"generating the built-in '{model}' checkpoint into {cache_dir()} (first use only)")
        bar, cb = progress_bar(model)
        with bar:
            return resolve.resolve_model(model, progress=cb)
    return resolve.resolve_model(model)


# ---- loading an engine --------------------------------------------------------------------------

def engine_options(f: Callable) -> Callable:
    """The options of hybrid.load(), for commands that run the model."""
    opts = [
        click.option("--backend", type=click.Choice(["auto", "numba", "reference"]),
                     help="Routed experts: Numba INT4 kernels, the torch fp32 reference (the oracle), or auto "
                          "(numba where the CPU has AVX2; the default)."),
        click.option("--context", type=click.IntRange(min=16), help="Tokens the KV cache holds (default: the engine's)."),
        click.option("--cpu-threads", type=click.IntRange(1, MAX_THREADS), help="Threads for the CPU experts."),
        click.option("--ram-budget", type=GB_SIZE, help="GB of RAM for routed experts."),
        click.option("--gpu-memory", type=GB_SIZE, help="GB of VRAM the plan may use."),
        click.option("--expert-mode", type=click.Choice(["mmap", "cache"]),
                     help="Routed experts from the page cache (mmap) or a RAM slot cache fed from disk."),
        click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]),
                     help="Where the GPU side runs (auto: CUDA when there is a GPU; cpu: everything on the CPU)."),
        click.option("--gpu-precision", type=click.Choice(["auto", "bf16", "int8"]),
                     help="Storage of the big GPU-side linears (auto: bf16 when it fits with the KV cache, else "
                          "int8 weight-only; without a GPU, bf16 weights with fp32 math, or int8 ones: faster, "
                          "int8's rounding)."),
        click.option("--hot-experts", type=click.IntRange(min=0),
                     help="Routed experts per MoE layer kept on the GPU (default: what the plan's spare VRAM holds)."),
        click.option("--prefill-chunk", type=click.IntRange(min=1),
                     help="Prompt tokens per forward pass (default 4096): bounds prefill memory on long prompts."),
        click.option("--decode-graphs", type=click.Choice(["auto", "on", "segments", "off"]),
                     help="Decode through a fixed-shape step, one CUDA graph per token on CUDA with the CPU expert "
                          "hops inside (auto: on with CUDA; on: also without CUDA, eagerly; segments: a graph per "
                          "segment, the host hopping between them, also where 'on' cannot run; off: the plain "
                          "forward)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


ENGINE_KEYS = ("backend", "context", "cpu_threads", "ram_budget", "gpu_memory", "expert_mode", "decode_graphs",
               "prefill_chunk", "hot_experts", "gpu_precision", "device")


def load_engine(path: Path, **options: Any):
    """hybrid.load with only the options the user gave (the rest keep the engine's defaults)."""
    from hybrid import load

    return load(path, **{k: v for k, v in options.items() if k in ENGINE_KEYS and v is not None})
