"""Host memory for weights that every decoded token streams: fresh anonymous memory on transparent huge pages.

Owns huge_bytes. runtime/gpu_side.py copies the non-expert weights into it, experts/ram_tables.py the
routed experts in ram mode; the measurements behind each are in those modules. Nothing here reads a file.
"""
from __future__ import annotations

import mmap

import numpy as np

HUGE = 2 << 20  # a transparent huge page on x86-64; a copy smaller than one holds none, so it stays in numpy's memory


def huge_bytes(size: int) -> np.ndarray:
    """size bytes, untouched: from HUGE in a private anonymous mapping of their own, starting on a huge
    page, its whole huge pages advised before any page of it is touched (the array holds the mapping; the
    last part-filled one is not advised, so it costs no more than its bytes); smaller, or where the platform
    has no such advice, numpy's memory (plain pages where the kernel refuses the advice)."""
    if size < HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(size, np.uint8)
    m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(m, np.uint8)
    start = -whole.ctypes.data % HUGE
    try:
        m.madvise(mmap.MADV_HUGEPAGE, start, size - size % HUGE)
    except OSError:  # a kernel without transparent huge pages
        pass
    return whole[start:start + size]
