"""A paged latent cache read into one contiguous fp32 block on the CPU: gather and widen in one pass.

Owns gather_rows. The cache lives in pages of P positions, each position one row of W values (K2: the
512-value normed latent and the 64-value roped key), stored as bf16 bits (uint16) or fp32; a
sequence's page table lists its pages in order. Two pools may hold them (the compute pool and a
host tier), so a table entry e >= 0 is page e of the first and e < 0 page -1 - e of the second.
The attention's GEMMs then read the gathered rows as they read a contiguous cache. Memory-bound;
pages split between threads. Pure functions on arrays; imports nothing from hybrid/.
Letters: S positions, P page size, W row width, N pages in a pool.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels_cpu.widen import widened3


@njit(nogil=True, cache=True, inline="always")
def _page(main, spill, table, S, out, k, k0):
    # rows k*P .. of the sequence from page table[k], in whichever pool holds it, to out[(k - k0)*P ..]
    P, W = main.shape[1], main.shape[2]
    e = table[k]
    src = main if e >= 0 else spill
    page = e if e >= 0 else -1 - e
    n = min(P, S - k * P)
    for r in range(n):
        row = (k - k0) * P + r
        for w in range(W):
            out[row, w] = widened3(src, page, r, w)


@njit(nogil=True, cache=True, parallel=True)
def _gather(main, spill, table, k0, S, out):
    P = main.shape[1]
    for k in prange(k0, (S + P - 1) // P):
        _page(main, spill, table, S, out, k, k0)


@njit(nogil=True, cache=True)
def _gather_serial(main, spill, table, k0, S, out):
    P = main.shape[1]
    for k in range(k0, (S + P - 1) // P):
        _page(main, spill, table, S, out, k, k0)


def gather_rows(main: np.ndarray, spill: np.ndarray, table: np.ndarray, S: int, out: np.ndarray,
                parallel: bool = True, start: int = 0) -> np.ndarray:
    """Positions start..S-1 of a paged sequence -> out[:S - start] (fp32 [>= S - start, W], returned).

    main, spill: pools [N, P, W] of one dtype (uint16 bf16 bits or float32; spill may be a one-page
    dummy when nothing is spilled); table int32 [>= ceil(S / P)]: e >= 0 main[e], e < 0 spill[-1 - e].
    start: a multiple of P. parallel=False: all on the calling thread (where a second Numba parallel
    region may not run)."""
    if main.dtype != spill.dtype or main.dtype not in (np.uint16, np.float32) or main.ndim != 3 \
            or spill.ndim != 3 or main.shape[1:] != spill.shape[1:]:
        raise ValueError(f"gather_rows: two pools [N, P, W] of one dtype (uint16 bf16 bits or float32) are needed, "
                         f"got {main.dtype} {main.shape} and {spill.dtype} {spill.shape}")
    P, W = main.shape[1], main.shape[2]
    pages = -(-S // P)
    if start % P or not 0 <= start <= S:
        raise ValueError(f"gather_rows: start {start} must be a multiple of the page size {P} in 0..{S}")
    if out.dtype != np.float32 or out.ndim != 2 or out.shape[0] < S - start or out.shape[1] != W \
            or not out.flags.c_contiguous:
        raise ValueError(f"gather_rows: out must be contiguous fp32 [>= {S - start}, {W}], got {out.dtype} {out.shape}")
    if table.dtype != np.int32 or table.shape[0] < pages:
        raise ValueError(f"gather_rows: table must be int32 with >= {pages} entries, got {table.dtype} {table.shape}")
    t = table[:pages]
    if S > start and (int(t[start // P:].max()) >= main.shape[0] or int(t[start // P:].min()) < -spill.shape[0]):
        raise ValueError(f"gather_rows: a page id lies outside the pools ({main.shape[0]} and {spill.shape[0]} pages)")
    (_gather if parallel else _gather_serial)(main, spill, t, start // P, S, out)
    return out[:S - start]
