"""Per-head products of absorbed-MLA decode on the CPU: the query into the latent space and the values
out of it, reading kv_b_proj as held ([H, P + V, L], contiguous: bf16 bits as uint16, widened in
registers like kernels_cpu.widen's GEMVs, or fp32), each head on one thread (parallel=False: all on the
calling thread, where a second parallel region beside the expert kernels' may not run).

Owns head_absorb and head_values, and prefetch_head_row (mla.py's decode streams kv_b the same way).
torch's batched product over 64 one-row heads ran at a fraction of the RAM bandwidth; these stream
each head's rows once, vectorised along the contiguous L. Pure functions on arrays; imports nothing
from hybrid/.
Letters: T tokens, H heads, P nope dim, V value dim, L latent rank.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels_cpu.simd import prefetch_l2_at
from kernels_cpu.widen import widened3

FASTMATH = {"reassoc", "contract"}  # a vectorised sum and FMA; NaN and inf keep their meaning
AHEAD = 4  # rows of kv_b prefetched into L2 ahead of the one being read (see prefetch_head_row)


@njit(nogil=True, cache=True, inline="always")
def prefetch_head_row(kvb, h, r):
    """Row r of head h of kv_b [H, P + V, L] into L2, if it exists (a row is 1 KB in bf16, 2 KB in fp32).
    A head's rows are one 128-256 KB stream; prefetched AHEAD rows ahead, K2's MLA decode read kv_b at
    13-14.5 GB/s against 11 without (2-core Xeon)."""
    if r < kvb.shape[1]:
        n = kvb.shape[2] * kvb.itemsize
        at = kvb.ctypes.data + (h * kvb.shape[1] + r) * n
        for line in range(0, n, 64):
            prefetch_l2_at(at + line)


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def _absorb_head(q, kvb, out, h):
    # out[t, h] = sum over p of q[t, h, p] * row p of head h
    T, _, P = q.shape
    L = kvb.shape[2]
    for t in range(T):
        for l in range(L):
            out[t, h, l] = 0.0
        for p in range(P):
            prefetch_head_row(kvb, h, p + AHEAD)
            qp = q[t, h, p]
            for l in range(L):
                out[t, h, l] += qp * widened3(kvb, h, p, l)


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def _values_head(o_lat, kvb, P, out, h):
    # out[t, h, v] = o_lat[t, h] . row P + v of head h
    T, _, L = o_lat.shape
    for t in range(T):
        for v in range(out.shape[2]):
            prefetch_head_row(kvb, h, P + v + AHEAD)
            acc = np.float32(0.0)
            for l in range(L):
                acc += o_lat[t, h, l] * widened3(kvb, h, P + v, l)
            out[t, h, v] = acc


@njit(nogil=True, cache=True, parallel=True, fastmath=FASTMATH)
def _absorb(q, kvb, out):
    for h in prange(q.shape[1]):
        _absorb_head(q, kvb, out, h)


@njit(nogil=True, cache=True, parallel=True, fastmath=FASTMATH)
def _values(o_lat, kvb, P, out):
    for h in prange(o_lat.shape[1]):
        _values_head(o_lat, kvb, P, out, h)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _absorb_serial(q, kvb, out):
    for h in range(q.shape[1]):
        _absorb_head(q, kvb, out, h)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _values_serial(o_lat, kvb, P, out):
    for h in range(o_lat.shape[1]):
        _values_head(o_lat, kvb, P, out, h)


def _check(a: np.ndarray, kvb: np.ndarray, name: str) -> None:
    if a.dtype != np.float32 or kvb.dtype not in (np.float32, np.uint16) or kvb.ndim != 3 or not kvb.flags.c_contiguous:
        raise ValueError(f"{name}: fp32 activations and a contiguous kv_b [H, P + V, L] (fp32, or bf16 bits as "
                         f"uint16) are needed, got {a.dtype} and {kvb.dtype} {kvb.shape}")


def head_absorb(q_nope: np.ndarray, kvb: np.ndarray, parallel: bool = True) -> np.ndarray:
    """q_nope fp32 [T, H, P], kvb [H, P + V, L] (fp32 or bf16 bits) -> q_lat [T, H, L] = q_nope[t, h] @ kvb[h, :P]."""
    _check(q_nope, kvb, "head_absorb")
    T, H, P = q_nope.shape
    if kvb.shape[0] != H or kvb.shape[1] <= P:
        raise ValueError(f"head_absorb: q_nope {q_nope.shape} does not fit kv_b {kvb.shape}")
    out = np.empty((T, H, kvb.shape[2]), np.float32)
    (_absorb if parallel else _absorb_serial)(np.ascontiguousarray(q_nope), kvb, out)
    return out


def head_values(o_lat: np.ndarray, kvb: np.ndarray, P: int, parallel: bool = True) -> np.ndarray:
    """o_lat fp32 [T, H, L], kvb [H, P + V, L] (fp32 or bf16 bits) -> o [T, H, V] = o_lat[t, h] @ kvb[h, P:].T."""
    _check(o_lat, kvb, "head_values")
    T, H, L = o_lat.shape
    if kvb.shape[0] != H or kvb.shape[2] != L or not 0 <= P < kvb.shape[1]:
        raise ValueError(f"head_values: o_lat {o_lat.shape} does not fit kv_b {kvb.shape} past P = {P}")
    out = np.empty((T, H, kvb.shape[1] - P), np.float32)
    (_values if parallel else _values_serial)(np.ascontiguousarray(o_lat), kvb, P, out)
    return out
