"""What a rank reports for placement: its read bandwidth, measured the same way on the head and on every
node (so the figures compare), and the RAM it gives the routed experts.

Owns the measurement only (kernels_cpu.membw.read_gbps over a buffer past the caches, on the threads the
expert kernels use: the best of several load shapes, so that machines compiled for other targets
compare); plan.py turns the figures into shares. GB = 10^9 bytes.
"""
from __future__ import annotations

import os

import numpy as np

from hybrid.checkpoint.reader import Checkpoint
from kernels_cpu.membw import read_gbps

PROBE_BYTES = 128 << 20
RAM_SHARE = 0.8  # of a machine's RAM, what its experts may use when no budget is given


def measure_gbps(threads: int | None = None, nbytes: int = PROBE_BYTES, reps: int = 3) -> float:
    """Best-of-reps read GB/s over nbytes on `threads` Numba threads (None: Numba's default)."""
    return read_gbps(np.ones(nbytes // 8, np.uint64), reps, threads)


def ram_total() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def head_budget(ckpt: Checkpoint) -> int:
    """The head's RAM for routed experts: its share of RAM less everything else the checkpoint holds."""
    other = sum(i.nbytes for n, i in ckpt.tensors.items() if ".mlp.experts." not in n)
    return max(0, int(RAM_SHARE * ram_total()) - other)
