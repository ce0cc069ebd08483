"""One bf16 weight row against fp32 activations, at the RAM's speed: the bf16 GEMV's inner loop (widen.py).

Owns row_dot (hand-written LLVM IR, as in simd.py and int8dot.py), deinterleave (the activation layout
it reads) and fits (where it applies); and f32_to_bf16, the rounding the kernels that write bf16 share
(amx_gemm's activation split, mla's cache rows). A row is read as 32-bit words, a full vector at a time: the low
half of a word is the even column's bf16 bits, the high half the odd column's, so `word << 16` and
`word & 0xFFFF0000` are the two columns as fp32, exactly, with no shuffles and no narrow loads. The
activations come deinterleaved to match (per PAIR columns: the even ones, then the odd ones), and
each column goes into one of two fp32 vector accumulators with an FMA. The result is the fp32 product
of the widened row up to summation order, as before.

One row at a time, with the row `ahead` bytes on prefetched into L2 as the row is read: a GEMV then is
one sequential stream per thread, as the RAM probe is. On a 2-core Xeon (Sapphire Rapids class), in
one sitting, against Numba's vectorised loop over four rows at a time (long rows) or one (short):

  | K2 shape [O, I] | before | row_dot | RAM probe |
  |---|---|---|---|
  | q_a_proj 1536 x 7168 | 22.0 GB/s | 28.6 | 29.5 |
  | o_proj 7168 x 8192 | 25.1 | 29.6 | 29.7 |
  | dense down 7168 x 18432 | 24.8 | 31.9 | 30.1 |
  | q_b_proj 12288 x 1536 | 18.5 | 28.3 | 30.2 |
  | shared down 7168 x 2048 | 20.5 | 28.3 | 30.0 |

Without the prefetch the same loop read 19-21 GB/s; four rows at once with it, 26-28.
Pure functions on arrays; imports nothing from hybrid/.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.simd import F32, I32, I64, hsum, host_has_avx2, prefetch_l2, vector_lanes

LANES = vector_lanes() // 2  # fp32 lanes per vector: 16 (zmm) or 8 (ymm)
PAIR = 2 * LANES  # columns per step: one vector of 32-bit words, an even and an odd column each
AHEAD_BYTES = 4096  # prefetch distance: at least this many bytes, and at least AHEAD_ROWS rows, ahead
AHEAD_ROWS = 2  # (1 KB rows read 25.6 GB/s 4 rows ahead against 24.9 at 2; 3-36 KB rows best at 2)
# A prefetch a step, before its loads: two steps a loop iteration with both prefetches at its top read 73%
# of the probe against 90% (917 MB [*, 7168], 2-core Xeon, one sitting); 6 KB ahead instead: level.


def fits(ncol: int) -> bool:
    """row_dot applies: whole steps of PAIR columns, on a CPU with AVX2 and FMA (x86-64)."""
    return ncol % PAIR == 0 and ncol > 0 and host_has_avx2()


@njit(nogil=True, cache=True)
def ahead_bytes(row_bytes):
    """How far ahead of the row being read row_dot prefetches, for rows of row_bytes each."""
    return row_bytes * max(AHEAD_ROWS, -(-AHEAD_BYTES // row_bytes))


@intrinsic
def row_dot(typingctx, w, x, ncol, ahead):
    """float32 dot of the bf16 row at address w (uint16 bits, ncol of them, any alignment) with the
    deinterleaved fp32 activations at address x (deinterleave); ncol a multiple of PAIR. Prefetches
    the bytes `ahead` past each vector it reads into L2 (prefetching never faults, past the end too)."""
    sig = types.float32(types.intp, types.intp, types.intp, types.intp)
    VU, VF = ir.VectorType(I32, LANES), ir.VectorType(F32, LANES)

    def codegen(context, b, signature, args):
        w, x, ncol, ahead = args
        fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(VF, [VF] * 3), f"llvm.fma.v{LANES}f32")
        acc = [cgutils.alloca_once_value(b, ir.Constant(VF, None)) for _ in range(2)]
        for a in acc:
            b.store(ir.Constant(VF, [ir.Constant(F32, 0.0)] * LANES), a)
        shift = ir.Constant(VU, [ir.Constant(I32, 16)] * LANES)
        high = ir.Constant(VU, [ir.Constant(I32, -65536)] * LANES)
        with cgutils.for_range(b, b.udiv(ncol, ir.Constant(I64, PAIR))) as step:
            at = b.add(w, b.mul(step.index, ir.Constant(I64, 2 * PAIR)))  # 2 bytes a column
            prefetch_l2(b, b.add(at, ahead))
            xs = b.add(x, b.mul(step.index, ir.Constant(I64, 4 * PAIR)))  # 4 bytes a column
            even = b.load(b.inttoptr(xs, VF.as_pointer()), align=4)
            odd = b.load(b.inttoptr(b.add(xs, ir.Constant(I64, 4 * LANES)), VF.as_pointer()), align=4)
            word = b.load(b.inttoptr(at, VU.as_pointer()), align=1)
            b.store(b.call(fma, [b.bitcast(b.shl(word, shift), VF), even, b.load(acc[0])]), acc[0])
            b.store(b.call(fma, [b.bitcast(b.and_(word, high), VF), odd, b.load(acc[1])]), acc[1])
        return hsum(b, b.fadd(b.load(acc[0]), b.load(acc[1])))

    return sig, codegen


@njit(nogil=True, cache=True)
def deinterleave(x, xd):
    """x f32 [T, I] -> xd f32 [T, I] as row_dot reads it: per PAIR columns, the even ones, then the odd."""
    T, I = x.shape
    for t in range(T):
        for c in range(0, I - PAIR + 1, PAIR):
            for i in range(LANES):
                xd[t, c + i] = x[t, c + 2 * i]
                xd[t, c + LANES + i] = x[t, c + 2 * i + 1]


@intrinsic
def f32_bits(typingctx, v):
    """float32 -> its bits as uint32."""
    sig = types.uint32(types.float32)

    def codegen(context, b, signature, args):
        return b.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(nogil=True, cache=True, inline="always")
def f32_to_bf16(v):
    """float32 -> bf16 bits (uint16), rounded to nearest even as torch rounds; NaN -> 0x7FC0."""
    u = f32_bits(v)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(0x7FC0)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
