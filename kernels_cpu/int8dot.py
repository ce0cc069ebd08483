"""int8 weight rows against int16 activations with vpmaddwd: the int8 GEMV's inner loop (widen.py).

Owns quantize_blocks (fp32 activations -> int16 codes and one fp32 scale per BLOCK columns) and
make_rows_kernel (R int8 rows x one token over the whole input dimension, hand-written LLVM IR as
in simd.py: Numba's vectoriser never emits vpmaddwd). Widening each int8 weight to fp32 for an FMA
made the int8 GEMV compute-bound on short rows (10-18 GB/s on a 2-core Xeon where bf16 weights, twice
the bytes, read 21-28); here 2L int8 weights cost a sign-extending load, one vpmaddwd and one add.

Per block of BLOCK columns the int32 sums of q * xq stay below BLOCK * 127 * 32767 < 2**31; each
block's sum is converted to fp32 once and scaled by its activation scale. Activation codes carry
15 bits per block, so x ~= xq * scale to 1 part in 65,534 of the block's largest value: far below
the int8 weights' own rounding (1 part in 254 of the row's).
Pure functions on arrays; imports nothing from hybrid/.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.simd import F32, I8, I16, I32, I64, hsum, prefetch_l2, vector_lanes

BLOCK = 128  # columns per activation scale and per exact int32 sum
# Each block of BLOCK columns prefetches the same columns of the next R rows into L2 (rows are
# contiguous): K2's q_b_proj shape, 12288 rows of 1.5 KB, 15-16 -> 20 GB/s on a 2-core Xeon (probe
# 32); into L1 it gained less (an L1 miss buffer held for the DRAM latency), long rows neither way.
PF_BLOCKS = 1


@njit(nogil=True, cache=True)
def quantize_blocks(x, xq, xs):
    """x f32 [T, I] (I a multiple of BLOCK) -> xq int16 [T, I], xs f32 [T, I // BLOCK] with
    x ~= xq * xs per block: xs = max |x| / 32767 (1 for an all-zero block), xq = round(x / xs)."""
    T, I = x.shape
    for t in range(T):
        for b in range(I // BLOCK):
            m = np.float32(0.0)
            for i in range(b * BLOCK, b * BLOCK + BLOCK):
                m = max(m, abs(x[t, i]))
            s = m / np.float32(32767.0) if m > 0 else np.float32(1.0)
            xs[t, b] = s
            inv = np.float32(1.0) / s
            for i in range(b * BLOCK, b * BLOCK + BLOCK):
                xq[t, i] = np.int16(min(32767.0, max(-32767.0, np.rint(x[t, i] * inv))))


def make_rows_kernel(R: int):
    """An intrinsic rows(w, wstride, xq, xs, nblk, res) -> None: res f32 [r] = sum over the nblk blocks
    of xs[b] * (int8 row r . xq over block b), for the R rows at w + r * wstride (bytes; any alignment).
    xq: int16 activations (one token), xs: f32 block scales; addresses as intp."""
    L = vector_lanes()  # int16 lanes per vector: 32 (zmm) or 16 (ymm)
    VB, VW, VD, VF = (ir.VectorType(I8, L), ir.VectorType(I16, L), ir.VectorType(I32, L // 2),
                      ir.VectorType(F32, L // 2))
    steps = BLOCK // L

    @intrinsic
    def rows(typingctx, w, wstride, xq, xs, nblk, res):
        sig = types.void(*([types.intp] * 6))

        def codegen(context, b, signature, args):
            w, wstride, xq, xs, nblk, res = args
            mod = b.module
            name = "llvm.x86.avx2.pmadd.wd" if L == 16 else "llvm.x86.avx512.pmaddw.d.512"
            madd = cgutils.get_or_insert_function(mod, ir.FunctionType(VD, [VW, VW]), name)
            fma = cgutils.get_or_insert_function(mod, ir.FunctionType(VF, [VF] * 3), f"llvm.fma.v{L // 2}f32")
            facc = [cgutils.alloca_once_value(b, ir.Constant(VF, None)) for _ in range(R)]
            rows_at = [b.add(w, b.mul(ir.Constant(I64, r), wstride)) for r in range(R)]
            ahead = b.mul(ir.Constant(I64, R * PF_BLOCKS), wstride)
            with cgutils.for_range(b, nblk) as blk:
                c0 = b.mul(blk.index, ir.Constant(I64, BLOCK))
                iacc = [ir.Constant(VD, None)] * R
                for r in range(R):
                    for line in range(0, BLOCK, 64):
                        prefetch_l2(b, b.add(b.add(rows_at[r], ahead), b.add(c0, ir.Constant(I64, line))))
                for j in range(steps):
                    col = b.add(c0, ir.Constant(I64, j * L))
                    xv = b.load(b.inttoptr(b.add(xq, b.mul(col, ir.Constant(I64, 2))), VW.as_pointer()), align=1)
                    for r in range(R):
                        wv = b.load(b.inttoptr(b.add(rows_at[r], col), VB.as_pointer()), align=1)
                        iacc[r] = b.add(iacc[r], b.call(madd, [b.sext(wv, VW), xv]))
                sp = b.load(b.inttoptr(b.add(xs, b.mul(blk.index, ir.Constant(I64, 4))), F32.as_pointer()))
                sv = b.insert_element(ir.Constant(VF, None), sp, ir.Constant(I32, 0))
                sv = b.shuffle_vector(sv, sv, ir.Constant(ir.VectorType(I32, L // 2), [0] * (L // 2)))
                for r in range(R):
                    b.store(b.call(fma, [b.sitofp(iacc[r], VF), sv, b.load(facc[r])]), facc[r])
            for r in range(R):
                b.store(hsum(b, b.load(facc[r])), b.inttoptr(b.add(res, ir.Constant(I64, 4 * r)), F32.as_pointer()))
            return context.get_dummy_value()

        return sig, codegen

    return rows
