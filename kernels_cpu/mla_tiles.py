"""Register tiles for the MLA page walk (mla.py): ROWS x TILE products summed in vector registers over
the whole reduction, for a page's scores (four positions x TILE heads, against the queries transposed
once a token) and for the value sums (four heads x TILE latent columns, over the page's rows).

Owns tile_set and tile_add, hand-written LLVM vector IR as in simd.py (fp32 FMAs only). The walk's old
loops summed each score along the latent (vectors of columns, summed across their lanes at the end: 32
horizontal sums a 4 x 4 block of heads and positions) and added a page's values into the sums in
memory four rows a pass (a load and a store of the sums each time).
Pure functions on addresses; imports nothing from hybrid/.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.simd import F32, I32, I64, vector_lanes

LANES = vector_lanes() // 2  # fp32 lanes a vector: 16 (zmm) or 8 (ymm)
TILE = 2 * LANES  # a tile's columns, two vectors: heads (scores) or latent columns (value sums)
ROWS = 4  # a tile's rows: positions (scores) or heads (value sums)


def _tile(b: ir.IRBuilder, a, astride, v, vstride, n, acc):
    """acc[c][k] (<LANES x float> allocas, c < ROWS, k < 2) += a[c, i] * v[i, k LANES : (k + 1) LANES] over
    i < n: a's rows astride bytes apart (f32, broadcast), v's rows vstride bytes apart (f32 vectors)."""
    VF = ir.VectorType(F32, LANES)
    fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(VF, [VF] * 3), f"llvm.fma.v{LANES}f32")
    with cgutils.for_range(b, n) as loop:
        i = loop.index
        row = b.add(v, b.mul(i, vstride))
        vs = [b.load(b.inttoptr(b.add(row, ir.Constant(I64, 4 * LANES * k)), VF.as_pointer()), align=4)
              for k in range(2)]
        for c in range(ROWS):
            s = b.load(b.inttoptr(b.add(b.add(a, b.mul(ir.Constant(I64, c), astride)), b.mul(i, ir.Constant(I64, 4))),
                                  F32.as_pointer()), align=4)
            sv = b.insert_element(ir.Constant(VF, None), s, ir.Constant(I32, 0))
            sv = b.shuffle_vector(sv, sv, ir.Constant(ir.VectorType(I32, LANES), [0] * LANES))
            for k in range(2):
                b.store(b.call(fma, [sv, vs[k], b.load(acc[c][k])]), acc[c][k])


def _zeros(b: ir.IRBuilder):
    VF = ir.VectorType(F32, LANES)
    acc = [[cgutils.alloca_once(b, VF) for _ in range(2)] for _ in range(ROWS)]
    for row in acc:
        for a in row:
            b.store(ir.Constant(VF, [ir.Constant(F32, 0.0)] * LANES), a)
    return acc


def _store_tile(b: ir.IRBuilder, acc, out, ostride, add: bool) -> None:
    VF = ir.VectorType(F32, LANES)
    for c in range(ROWS):
        for k in range(2):
            at = b.inttoptr(b.add(b.add(out, b.mul(ir.Constant(I64, c), ostride)), ir.Constant(I64, 4 * LANES * k)),
                            VF.as_pointer())
            v = b.load(acc[c][k])
            b.store(b.fadd(b.load(at, align=4), v) if add else v, at, align=4)


def _tile_intrinsic(add: bool):
    @intrinsic
    def tile(typingctx, a, astride, v, vstride, n, out, ostride):
        sig = types.void(*([types.intp] * 7))

        def codegen(context, b, signature, args):
            a, astride, v, vstride, n, out, ostride = args
            acc = _zeros(b)
            _tile(b, a, astride, v, vstride, n, acc)
            _store_tile(b, acc, out, ostride, add)
            return context.get_dummy_value()

        return sig, codegen

    return tile


# tile_set(a, astride, v, vstride, n, out, ostride): out[c, j] = sum over i < n of a[c, i] * v[i, j] for
# c < ROWS, j < TILE (f32; a's, v's and out's rows astride, vstride, ostride bytes apart), the sum in i
# order with FMAs; tile_add the same added to out. Addresses and strides as intp.
tile_set = _tile_intrinsic(False)
tile_add = _tile_intrinsic(True)


@njit(nogil=True, cache=True)
def aligned(rows, cols):
    """An uninitialised f32 [rows, cols] whose first element sits on a 64-byte boundary: the tiles' vectors
    straddle no cache line where a row's bytes are a multiple of 64 (numba's arrays are 16-byte aligned:
    on one thread's value sums, split, a K2 layer's walk took 52 us against 35 on the other's)."""
    raw = np.empty(rows * cols + 16, np.float32)
    off = ((-raw.ctypes.data) % 64) // 4
    return raw[off:off + rows * cols].reshape(rows, cols)
