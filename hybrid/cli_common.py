"""What every `kimi-hybrid` command shares: the consoles, the user-error types, `--model` resolution
(checkpoint directory, a Hugging Face repo id already in the local HF cache, or a built-in preset
generated on first use with a progress bar) and the engine-loading options.

Never downloads anything: a model that is not here is an error that prints the command that fetches it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

from .chat import ChatTemplateError
from .checkpoint import CheckpointError
from .config import ConfigError
from .synth import PRESETS, GeneratorError, cache_dir, ensure_preset, is_generated, preset_path
from .tokenizer import TokenizerError

console = Console(highlight=False)  # no automatic colouring of numbers and brackets in model text
err_console = Console(stderr=True, highlight=False)

REAL_MODEL = "moonshotai/Kimi-K2-Thinking"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UserError(Exception):
    """A mistake the user can fix; the message says how."""


USER_ERRORS = (UserError, CheckpointError, ConfigError, GeneratorError, TokenizerError, ChatTemplateError,
               ValueError, OSError)


def progress_bar(label: str) -> tuple[Progress, Callable[[int, int], None]]:
    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=err_console, transient=True)
    task = bar.add_task(label, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


# ---- --model ----------------------------------------------------------------------------------

def hf_hub_cache() -> Path:
    """Where huggingface_hub keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def find_in_hf_cache(repo_id: str, hub: Path | None = None) -> Path | None:
    """The snapshot directory of `repo_id` in the HF cache: the one refs/main names, else the newest."""
    repo = (hub or hf_hub_cache()) / f"models--{repo_id.replace('/', '--')}"
    snaps = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file() and (snaps / ref.read_text().strip()).is_dir():
        return snaps / ref.read_text().strip()
    found = sorted((p for p in snaps.glob("*") if (p / "config.json").exists()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def fetch_hint(repo_id: str) -> str:
    return (f"fetch it with `hf download {repo_id}` (older huggingface_hub: `huggingface-cli download "
            f"{repo_id}`) and run this again, or add `--local-dir DIR` to that and pass --model DIR")


def resolve_model(model: str) -> Path:
    """--model -> a checkpoint directory. Presets are generated on first use, with a progress bar."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if model in PRESETS:
        path = preset_path(model)
        if not is_generated(path):
            err_console.print(f"generating the built-in '{model}' checkpoint into {cache_dir()} (first use only)")
            bar, cb = progress_bar(model)
            with bar:
                return ensure_preset(model, progress=cb)
        return ensure_preset(model)
    if _REPO_ID.match(model) and not model.startswith("."):
        found = find_in_hf_cache(model)
        if found is not None:
            return found
        raise UserError(f"{model} is not in the Hugging Face cache ({hf_hub_cache()}) nor a directory here; "
                        f"{fetch_hint(model)}")
    if p.is_file():
        raise UserError(f"{model} is a file; --model takes a checkpoint directory (the folder with config.json)")
    raise UserError(f"{model}: no such checkpoint directory; --model takes a directory, a Hugging Face repo id in "
                    f"the local cache (like {REAL_MODEL}) or a preset ({', '.join(PRESETS)})")


# ---- loading an engine --------------------------------------------------------------------------

def engine_options(f: Callable) -> Callable:
    """The options of hybrid.load(), for commands that run the model."""
    opts = [
        click.option("--backend", type=click.Choice(["auto", "numba", "reference"]),
                     help="Routed experts: Numba INT4 kernels, the torch fp32 reference (the oracle), or auto "
                          "(numba where the CPU has AVX2; the default)."),
        click.option("--context", type=click.IntRange(min=16), help="Tokens the KV cache holds (default: the engine's)."),
        click.option("--cpu-threads", type=click.IntRange(min=1), help="Threads for the CPU experts."),
        click.option("--ram-budget", type=float, help="GB of RAM for routed experts."),
        click.option("--gpu-memory", type=float, help="GB of VRAM the plan may use."),
        click.option("--expert-mode", type=click.Choice(["mmap", "cache"]),
                     help="Routed experts from the page cache (mmap) or a RAM slot cache fed from disk."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


ENGINE_KEYS = ("backend", "context", "cpu_threads", "ram_budget", "gpu_memory", "expert_mode")


def load_engine(path: Path, **options: Any):
    """hybrid.load with only the options the user gave (the rest keep the engine's defaults)."""
    from . import load

    return load(path, **{k: v for k, v in options.items() if k in ENGINE_KEYS and v is not None})
