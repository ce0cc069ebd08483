"""Routed-expert storage and the Numba expert backend (mmap mode).

Owns where routed experts live for the CPU kernels: each MoE layer gets a kernels_cpu.ExpertTable
pointing straight into the memory-mapped shard files (no copies; the page cache is the store).
The backend runs the kernel on a worker thread (the kernel releases the GIL) so the shared expert
on the GPU side overlaps with it. Cache mode (a RAM slot cache fed by explicit reads) is not built yet.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from kernels_cpu.moe import moe_forward
from kernels_cpu.table import PARTS, ExpertTable

from .checkpoint import Checkpoint
from .layout import expert_prefix


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
                    arenas.append(ckpt.file_buffer(info.file))
                loc[e, m] = (files[info.file], info.offset)
        tables[layer] = ExpertTable(arenas, loc, cfg.hidden_size, cfg.moe_intermediate_size, cfg.group_size)
    return tables


class NumbaExperts:
    """Expert backend: submit() starts the INT4 kernel on a worker thread; wait() returns y [T, D]."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.tables = mmap_tables(ckpt)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experts")

    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Future:
        xn = x.detach().float().cpu().numpy()
        idn = ids.cpu().numpy().astype(np.int64)
        wn = weights.detach().float().cpu().numpy()
        return self._pool.submit(moe_forward, xn, idn, wn, self.tables[layer])

    def wait(self, handle: Future) -> torch.Tensor:
        return torch.from_numpy(handle.result())

    def close(self) -> None:
        self._pool.shutdown(wait=True)
