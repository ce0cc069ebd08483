"""Routing counts kept across sessions, so hot experts are chosen before the first request.

Owns one file per checkpoint: int64 [MoE layers, experts], how often each expert was routed to,
written atomically after each request and read at load. A file that cannot be read or does not fit
the model is reported and ignored: the counts only decide where experts run, never the results.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from hybrid.checkpoint.paths import cache_dir

log = logging.getLogger(__name__)


def default_path(checkpoint: Path) -> Path:
    """<cache>/routing/<name>-<digest>.npy, the digest over the checkpoint's path and config.json."""
    checkpoint = Path(checkpoint).resolve()
    h = hashlib.sha1(str(checkpoint).encode())
    config = checkpoint / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    return cache_dir() / "routing" / f"{checkpoint.name}-{h.hexdigest()[:12]}.npy"


def load_counts(path: Path, moe_layers: list[int], n_experts: int) -> dict[int, np.ndarray] | None:
    """-> {layer: int64 [E]} from `path`, or None (no file yet, or one that does not fit: logged)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        counts = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        log.warning("routing statistics %s are unreadable (%s); ignoring them, they will be rewritten", path, e)
        return None
    want = (len(moe_layers), n_experts)
    if counts.shape != want or counts.dtype.kind not in "iu" or (counts < 0).any():
        log.warning("routing statistics %s hold %s %s, not non-negative integers %s for this model; ignoring them",
                    path, counts.dtype, list(counts.shape), list(want))
        return None
    return {layer: counts[j].astype(np.int64) for j, layer in enumerate(moe_layers)}


def save_counts(path: Path, counts: dict[int, np.ndarray], moe_layers: list[int], n_experts: int) -> None:
    """Write the counts (layers without any as zeros) to `path` atomically; a failure is logged, not raised."""
    path = Path(path)
    table = np.zeros((len(moe_layers), n_experts), dtype=np.int64)
    for j, layer in enumerate(moe_layers):
        if layer in counts:
            table[j] = counts[layer]
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, table, allow_pickle=False)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not save routing statistics to %s: %s", path, e)
        tmp.unlink(missing_ok=True)
