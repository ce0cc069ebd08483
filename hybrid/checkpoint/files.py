"""A checkpoint's file names and CheckpointError, with no heavy imports (no numpy, no torch), so that
model resolution and the CLI can name them before anything loads. Reads nothing: reader.py does.
"""
from __future__ import annotations

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(Exception):
    """The checkpoint on disk is incomplete or inconsistent; the message names file and tensor."""
