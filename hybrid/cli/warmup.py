"""Loading an engine for a command, with something on screen for each wait: a spinner while the checkpoint
is validated and mapped, then one while the model runs once on a few tokens (hybrid.runtime.warmup), so Numba
compiles the CPU kernels (the first run only; later runs load them from its cache) before the first prompt and
never inside an answer's tok/s. Renders on stderr only.
"""
from __future__ import annotations

from typing import Any, Callable

from rich.console import Console

from hybrid.runtime import warmup
from hybrid.runtime.warmup import COMPILING, WARMING, kernels_cached


def warm_up(engine: Any, console: Console) -> None:
    """hybrid.runtime.warmup.warm_up under a spinner saying what it waits for."""
    with console.status(f"{WARMING if kernels_cached() else COMPILING}..."):
        warmup.warm_up(engine)


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
