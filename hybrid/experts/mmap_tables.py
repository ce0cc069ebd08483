"""Routed-expert storage in mmap mode: ExpertTables straight over the memory-mapped shard files.

Owns describing where each routed expert lies for the CPU kernels, with no copies: the page cache
is the store. Cache mode (RAM slots fed by explicit reads) lives in cache.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kernels_cpu.table import PARTS, ExpertTable

from hybrid.checkpoint.reader import Checkpoint
from hybrid.checkpoint.layout import expert_prefix


def mmap_tables(ckpt: Checkpoint) -> dict[int, ExpertTable]:
    """One ExpertTable per MoE layer over the shard files' maps (validated by Checkpoint already)."""
    cfg = ckpt.config
    files: dict[Path, int] = {}
    arenas: list[np.ndarray] = []
    tables: dict[int, ExpertTable] = {}
    for layer in cfg.moe_layers:
        loc = np.empty((cfg.n_routed_experts, len(PARTS), 2), dtype=np.int64)
        for e in range(cfg.n_routed_experts):
            for m, part in enumerate(PARTS):
                proj, suffix = part.split(".")
                info = ckpt.info(f"{expert_prefix(layer, e, proj)}.{suffix}")
                if info.file not in files:
                    files[info.file] = len(arenas)
                    arenas.append(ckpt.file_buffer(info.file, huge_pages=True))  # streamed every token
                loc[e, m] = (files[info.file], info.offset)
        tables[layer] = ExpertTable(arenas, loc, cfg.hidden_size, cfg.moe_intermediate_size, cfg.group_size)
    return tables
