"""Where kimi-hybrid keeps what it writes for itself: generated presets, routing counts.

Owns the one rule for the cache directory, so the layers that write into it (hybrid.synth, hybrid.experts)
agree without importing each other. Creates nothing: a caller makes the folders it writes.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$KIMI_HYBRID_CACHE, else $XDG_CACHE_HOME/kimi-hybrid, else ~/.cache/kimi-hybrid (read at each call)."""
    if os.environ.get("KIMI_HYBRID_CACHE"):
        return Path(os.environ["KIMI_HYBRID_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kimi-hybrid"
