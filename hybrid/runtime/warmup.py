"""Running an engine once before its first prompt or request, so that Numba compiles the CPU kernels (the first
run on a machine; later runs load them from its cache) outside every answer's time and tok/s. Says nothing
itself: the CLI shows a spinner (cli/warmup.py), the server logs a line (serve/app.py).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

WARM_PROMPT = [0, 1, 2, 3]  # a multi-token prefill and then decode steps: both kernel paths compile
WARM_TOKENS = 2
COMPILING = "compiling CPU kernels, first run only (about a minute; later runs load them from the cache)"
WARMING = "warming up the kernels"


def kernels_cached() -> bool:
    """Whether Numba's on-disk cache already holds the expert kernel (its index file: NUMBA_CACHE_DIR, else the
    __pycache__ beside kernels_cpu)."""
    import kernels_cpu  # Numba: imported here, so a command's --help does not pay for it

    root = Path(os.environ.get("NUMBA_CACHE_DIR") or Path(kernels_cpu.__file__).parent / "__pycache__")
    return any(root.rglob("moe.*.nbi")) if root.is_dir() else False


def warm_up(engine: Any) -> None:
    """Run the model once on WARM_PROMPT (prefill, then WARM_TOKENS decode steps), then clear the statistics so
    no figure counts it."""
    for _ in engine.generate(WARM_PROMPT, max_new_tokens=WARM_TOKENS, temperature=0.0):
        pass
    engine.reset_stats()
