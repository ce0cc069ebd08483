"""Shared fixtures: tiny synthetic checkpoints in the exact on-disk format, written once per session."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Triton kernels run through Triton's interpreter on a machine without CUDA (set before any import of them)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybrid.synth.writer import preset_config, write_checkpoint

SHARED_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "kimi-k2-thinking"
REAL_CONFIG = Path(__file__).resolve().parents[1] / "hybrid" / "assets" / "config.json"


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(seed=0, **config_overrides) -> Path of a tiny checkpoint (cached per arguments)."""
    made: dict[str, Path] = {}

    def make(seed: int = 0, **over) -> Path:
        key = json.dumps([seed, over], sort_keys=True)
        if key not in made:
            cfg = preset_config("tiny")
            cfg.update(over)
            made[key] = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", cfg, seed=seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_path(make_checkpoint) -> Path:
    return make_checkpoint()
