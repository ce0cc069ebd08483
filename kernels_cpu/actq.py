"""Per-group int16 quantisation of fp32 activations into the layout the SIMD row kernel reads.

Owns the activation side of the INT4 x INT16 dot product only (see simd.py for the layout).
Group = 32 columns, symmetric: dg = amax / QMAX, xa = rint(x / dg) in [-QMAX, QMAX]. The
relative error this adds to a dot product is ~3e-5 (tolerance of the kernels' tests: 1e-4).
Where the CPU has VNNI, each int16 slot pair holds the code split into two signed bytes instead.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels_cpu.simd import has_vnni, vector_lanes

GROUP = 32
CHUNK = 4 * vector_lanes()  # columns per weight vector load: 64 (AVX2) or 128 (AVX-512)
VNNI = has_vnni()  # the byte layout vpdpbusd reads, below
# vpdpbusd takes each code as two signed bytes, a = 256 h + l, l in [-128, 127]: h fits a byte up to
# 127 * 256 + 127
QMAX = 32639 if VNNI else 32767


@njit(nogil=True, cache=True, inline="always")
def _group_scale(x, g):
    """Group g of row x -> (amax, QMAX / amax or 0): a code is _code(value, the latter)."""
    amax = np.float32(0.0)
    for i in range(GROUP):
        amax = max(amax, abs(x[g * GROUP + i]))
    return amax, (np.float32(QMAX) / amax if amax > 0 else np.float32(0.0))


@njit(nogil=True, cache=True, inline="always")
def _code(v, inv):
    return min(QMAX, max(-QMAX, np.int32(np.rint(v * inv))))


@njit(nogil=True, cache=True, inline="always")
def quantize_row(x, xa, dg, xs):
    """One row: x f32 [din] -> xa i16 [din] (chunk-transposed, see simd.py), dg f32 [din/32], xs f32
    [din/32] (outputs given). Inlined into the caller's loop (moe.py quantises rows inside its kernel)."""
    din = x.shape[0]
    xb = xa.view(np.int8)
    for g in range(din // GROUP):
        amax, inv = _group_scale(x, g)
        d = amax / np.float32(QMAX)
        s = 0
        for i in range(GROUP):
            q = _code(x[g * GROUP + i], inv)
            s += q
            col = g * GROUP + i
            c, j = col // CHUNK, col % CHUNK               # column j = 4i' + k of chunk c
            if VNNI:                                       # bytes: h even, h odd, l even, l odd
                h = (q + 128) >> 8
                o = 2 * c * CHUNK + (j % 2) * (CHUNK // 2) + j // 2
                xb[o] = h
                xb[o + CHUNK] = q - 256 * h
            else:
                xa[c * CHUNK + (j % 4) * (CHUNK // 4) + j // 4] = q
        dg[g] = d
        xs[g] = np.float32(-8 * s)


@njit(nogil=True, cache=True, parallel=True)
def quantize_rows(x, xa, dg, xs):
    """x f32 [N, din] -> xa int16 [N, din], dg f32 [N, din/32], xs f32 [N, din/32] (outputs given)."""
    for n in prange(x.shape[0]):
        quantize_row(x[n], xa[n], dg[n], xs[n])


@njit(nogil=True, cache=True)
def quantize_rows_serial(x, xa, dg, xs):
    """Same as quantize_rows, on the calling thread (for a handful of rows)."""
    for n in range(x.shape[0]):
        quantize_row(x[n], xa[n], dg[n], xs[n])


@njit(nogil=True, cache=True, inline="always")
def quantize_row_panel(x, xp, dgp, xsp):
    """One row for panel.py's kernel: x f32 [din] (din a multiple of 256) -> xp i16 [din], dgp f32
    [din/32], xsp int32 [din/32] in that module's layout (outputs given). The same codes and scales as
    quantize_row, at other places."""
    for g in range(x.shape[0] // GROUP):
        s, p, h = g // 8, (g % 8) // 2, g % 2
        j = 4 * h + p                                   # the group's int32 lane in the panel kernel
        amax, inv = _group_scale(x, g)
        tot = 0
        for o in range(GROUP):                         # o = 8 v + 4 e + k
            q = _code(x[g * GROUP + o], inv)
            tot += q
            xp[256 * s + 64 * (o // 8) + 16 * (o % 4) + 2 * j + (o // 4) % 2] = q
        dgp[8 * s + j] = amax / np.float32(QMAX)
        xsp[8 * s + j] = -8 * tot
