"""Loading an engine for a command, with something on screen for each wait: a spinner while the checkpoint
is validated and mapped, then one while the model runs once on a few tokens, so Numba compiles the CPU
kernels (the first run only; later runs load them from its cache) before the first prompt and never
inside an answer's tok/s. Renders on stderr only; drives the engine through generate and reset_stats.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

import kernels_cpu

WARM_PROMPT = [0, 1, 2, 3]  # a multi-token prefill and then decode steps: both kernel paths compile
WARM_TOKENS = 2
COMPILING = "compiling CPU kernels, first run only (about a minute; later runs load them from the cache)..."
WARMING = "warming up the kernels..."


def kernels_cached() -> bool:
    """Whether Numba's on-disk cache already holds the expert kernel (its index file: NUMBA_CACHE_DIR, else the
    __pycache__ beside kernels_cpu)."""
    root = Path(os.environ.get("NUMBA_CACHE_DIR") or Path(kernels_cpu.__file__).parent / "__pycache__")
    return any(root.rglob("moe.*.nbi")) if root.is_dir() else False


def warm_up(engine: Any, console: Console) -> None:
    """Run the model once on WARM_PROMPT (prefill, then WARM_TOKENS decode steps) under a spinner saying what it
    waits for, then clear the statistics so no figure counts it."""
    label = WARMING if kernels_cached() else COMPILING
    with console.status(label):
        for _ in engine.generate(WARM_PROMPT, max_new_tokens=WARM_TOKENS, temperature=0.0):
            pass
    engine.reset_stats()


def load_with_progress(load: Callable[[], Any], model: str, console: Console, warm: bool = True) -> Any:
    """load() under a 'loading' spinner, then warm_up (unless warm is False); -> the engine."""
    with console.status(f"loading {model}: validating the checkpoint and mapping the shards..."):
        engine = load()
    if warm:
        try:
            warm_up(engine, console)
        except BaseException:
            engine.close()
            raise
    return engine
