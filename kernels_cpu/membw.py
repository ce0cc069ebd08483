"""The DRAM read-bandwidth kernel: a threaded sum over a buffer far larger than the caches.

Owns read_sum only, the ceiling that `bench --kernels`, `bench` and `plan` all measure the expert
kernels against (the timing lives with them). A pure function on an array; imports nothing from hybrid/.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(nogil=True, cache=True, parallel=True)
def read_sum(buf, nblocks):
    """buf uint64 [n] -> the sum of buf[:nblocks * (n // nblocks)] (mod 2**64), every byte of it read once."""
    # each block summed with unit stride (vectorised), blocks spread over threads
    n = buf.shape[0] // nblocks
    part = np.zeros(nblocks, np.uint64)
    for b in prange(nblocks):
        s = buf[b * n:(b + 1) * n]
        acc = np.uint64(0)
        for i in range(s.shape[0]):
            acc += s[i]
        part[b] = acc
    return part.sum()
