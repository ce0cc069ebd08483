"""kimi-hybrid: run Kimi K2 Thinking on one workstation. `engine = hybrid.load(path_or_preset)`.

The public face, and the one place that may import every package: it joins the runtime's loader to
hybrid.synth's built-in presets, so `hybrid.load("tiny")` writes the tiny model on first use while the
runtime itself never imports synth. load, Engine and Checkpoint import torch, so they are imported on first
use (PEP 562 __getattr__, here only): `import hybrid.cli...` (a subpackage) must not pay for torch before
click has parsed `--help`.
"""
from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

from hybrid.checkpoint.config import ConfigError, ModelConfig
from hybrid.checkpoint.files import CheckpointError

if TYPE_CHECKING:
    from hybrid.checkpoint.reader import Checkpoint
    from hybrid.runtime.engine import Engine

__all__ = ["load", "Engine", "Checkpoint", "CheckpointError", "ModelConfig", "ConfigError"]

_LAZY = {"Engine": "hybrid.runtime.engine", "Checkpoint": "hybrid.checkpoint.reader"}


def _make_load() -> Any:
    from hybrid.runtime import loader
    from hybrid.synth.writer import preset_makers

    @functools.wraps(loader.load, assigned=("__doc__",))  # its docstring, and its signature for help()
    def load(model: Any = "tiny", **options: Any) -> Any:
        options.setdefault("presets", preset_makers())
        return loader.load(model, **options)

    load.__module__ = __name__
    return load


def __getattr__(name: str) -> Any:
    if name == "load":
        value = _make_load()
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'hybrid' has no attribute {name!r}")
    globals()[name] = value  # once: later lookups find it here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
