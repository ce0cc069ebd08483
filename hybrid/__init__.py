"""kimi-hybrid: run Kimi K2 Thinking on one workstation. `engine = hybrid.load(path_or_preset)`.

The public face, and the one place that may import every package: it joins the runtime's loader to
hybrid.synth's built-in presets, so `hybrid.load("tiny")` writes the tiny model on first use while the
runtime itself never imports synth.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from hybrid.checkpoint.reader import Checkpoint, CheckpointError
from hybrid.checkpoint.config import ConfigError, ModelConfig
from hybrid.runtime import loader
from hybrid.runtime.engine import Engine
from hybrid.synth.writer import preset_makers

__all__ = ["load", "Engine", "Checkpoint", "CheckpointError", "ModelConfig", "ConfigError"]


@functools.wraps(loader.load, assigned=("__doc__",))  # its docstring, and its signature for help()
def load(model: str | Path = "tiny", **options: Any) -> Engine:
    options.setdefault("presets", preset_makers())
    return loader.load(model, **options)
