"""int8 weight rows against int16 activations with vpmaddwd: the int8 GEMV's inner loop (widen.py).

Owns quantize_blocks (fp32 activations -> int16 codes and one fp32 scale per BLOCK columns),
dequantize_rows (a block of codes -> fp32 for a prompt's GEMM) and make_rows_kernel (R int8 rows x
one token over the whole input dimension, hand-written LLVM IR as in simd.py: Numba's vectoriser
never emits vpmaddwd). Widening each int8 weight to fp32 for an FMA
made the int8 GEMV compute-bound on short rows (10-18 GB/s on a 2-core Xeon where bf16 weights, twice
the bytes, read 21-28); here 2L int8 weights cost a sign-extending load, one vpmaddwd and one add.

Per block of BLOCK columns the int32 sums of q * xq stay below BLOCK * 127 * 32767 < 2**31; each
block's sum is converted to fp32 once and scaled by its activation scale. Activation codes carry
15 bits per block, so x ~= xq * scale to 1 part in 65,534 of the block's largest value: far below
the int8 weights' own rounding (1 part in 254 of the row's).

Where the CPU has VNNI the products go through vpdpbusd instead (unsigned bytes x signed bytes, four
per int32 lane), an activation code a = 256 h + l split into a signed high byte h and an unsigned low
byte l: the low bytes multiply the codes w as they are (l unsigned, w signed), the high bytes multiply
w + 128 (w with its sign bit flipped, now unsigned) and start from -128 * (the lane's h), a per-token
constant (vnni_layout), so that the high sum is sum(w * h) exactly. The lane sums equal the vpmaddwd
path's, bit for bit; a row costs an xor and two vpdpbusd per vector of weights against a sign
extension, two vpmaddwd and two adds (K2's shapes, 2-core Xeon: see widen.py).
Pure functions on arrays; imports nothing from hybrid/.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.simd import F32, I8, I16, I32, I64, has_vnni, hsum, prefetch_l2, vector_lanes

BLOCK = 128  # columns per activation scale and per exact int32 sum
# Each block of BLOCK columns prefetches the same columns of the next R rows into L2 (rows are
# contiguous): K2's q_b_proj shape, 12288 rows of 1.5 KB, 15-16 -> 20 GB/s on a 2-core Xeon (probe
# 32); into L1 it gained less (an L1 miss buffer held for the DRAM latency), long rows neither way.
PF_BLOCKS = 1
# One token's rows are read one at a time instead (widen._rows_i8), one stream through the matrix, each
# block prefetching the bytes STREAM_AHEAD past it into L2 (the next row's where the row ends first).
# K2's shapes, 2-core Xeon, interleaved call by call against the 8- and 2-row blocks above (two copies of
# those, 24 rounds, probe 32.8): qa+kva +2.5%, q_b +16%, o_proj +5%, the shared expert's gate and up +3%
# and down +5%, the dense gate and up +2%, dense down +0.5%; the same bits (each row's sums in the same
# order). A whole row ahead instead of 6 KB: up to -13% on the 18 KB rows; 4 or 8 KB: about level.
# Prefetching a 0.5-4 KB span at once every that many bytes instead of a line a block: -7 to -32% on
# K2's shapes (the larger the span, the slower). vpmaddwd at zmm or ymm width, or vpdpbusd at ymm,
# instead of vpdpbusd at zmm: -9 to +6% by shape, no better overall (2-core Xeon, one sitting).
# A block's two prefetches one before each of its vectors instead of both first: level (-6 to +8%).
# Against the bf16 GEMV over the same bytes (bf16dot.row_dot: 88-92% of the probe where this read 76-81%,
# a 917 MB [*, 7168] matrix, 2-core Xeon, one sitting) none of these closed the gap, each level within the
# noise: the rows through AMX tiles (tdpbssd, 16 rows a tile, no vector arithmetic a line; rows in place or
# tile-major, prefetched or not: 72-84%), ymm vectors (AVX-VNNI), each weight line as two ymm loads
# (inline asm: LLVM merges plain ones), the activations on a line or 32 bytes off one, several rows a
# call, the prefetches after a block's vectors; vpaddd for vpdpbusd -5%. What moved it: the activation
# codes read from a 1-2 KB window instead of the row's 14 KB (wrong sums; a probe of the cause) +5-7%,
# which the bf16 GEMV (28 KB of activations) and the expert kernel did not gain. A tile-major copy (each 8
# rows x 512 columns contiguous, tiles in row-block order), read a row's 512 columns at a time in memory
# order: +7-10% where rows are 7 KB or longer (7168: 31.5 -> 34.0 GB/s; 8192, 18432 alike; probe 37),
# level on 1.5-2 KB rows: int8tiles.py, with why its sums go tile by tile (scripts/int8_layout_bench.py).
# That order over the rows in place (8 rows 7 KB apart, 512 bytes of each in turn): -15%. int8w holds its
# weights so where the shape fits (runtime/gpu_side.host_tiles); this kernel reads the others.
STREAM_AHEAD = 6144
VNNI = has_vnni()  # vpdpbusd over vnni_layout's bytes; else vpmaddwd over the int16 codes
CH = 2 * vector_lanes()  # columns per vector of weights with VNNI: 64 (zmm) or 32 (ymm)


@njit(nogil=True, cache=True)
def quantize_blocks(x, xq, xs):
    """x f32 [T, I] (I a multiple of BLOCK) -> xq int16 [T, I], xs f32 [T, I // BLOCK] with
    x ~= xq * xs per block: xs = max |x| / 32767 (1 for an all-zero block), xq = round(x / xs)."""
    for t in range(x.shape[0]):
        quantize_token(x, xq, xs, t)


@njit(nogil=True, cache=True, inline="always")
def quantize_token(x, xq, xs, t):
    """quantize_blocks for row t alone (int8gemm runs the rows of a prompt in parallel). The block's
    largest |x| is taken over the values' bits with the sign cleared (for floats that are not NaN the
    same order as their magnitudes, and an integer max vectorises where a float one may not), the codes
    rounded in fp32 and clamped as integers: the same codes as clamping before the cast (the bound is
    whole)."""
    for b in range(x.shape[1] // BLOCK):
        top = np.uint32(0)
        for i in range(b * BLOCK, b * BLOCK + BLOCK):
            v = f32_bits(x[t, i]) & np.uint32(0x7FFFFFFF)
            top = max(top, v if v <= np.uint32(0x7F800000) else np.uint32(0))  # a NaN skipped, as max(m, NaN) did
        m = bits_f32(top)
        s = m / np.float32(32767.0) if m > 0 else np.float32(1.0)
        xs[t, b] = s
        inv = np.float32(1.0) / s
        for i in range(b * BLOCK, b * BLOCK + BLOCK):
            xq[t, i] = np.int16(min(32767, max(-32767, np.int32(np.rint(x[t, i] * inv)))))


@intrinsic
def f32_bits(typingctx, v):
    """float32 -> its bits as uint32."""
    def codegen(context, b, signature, args):
        return b.bitcast(args[0], I32)

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, v):
    """uint32 bits -> the float32 they are."""
    def codegen(context, b, signature, args):
        return b.bitcast(args[0], F32)

    return types.float32(types.uint32), codegen


@njit(nogil=True, cache=True)
def quantize_activations(x):
    """x f32 [T, I] (I a multiple of BLOCK) -> (codes, xs, xc), what the row kernels read for each row of
    x: quantize_blocks' int16 codes as bytes [T, 2 I] and no xc ([T, 0]); with VNNI vnni_layout's."""
    T, I = x.shape
    xq = np.empty((T, I), np.int16)
    xs = np.empty((T, I // BLOCK), np.float32)
    quantize_blocks(x, xq, xs)
    if not VNNI:
        return xq.view(np.int8), xs, np.empty((T, 0), np.int32)
    xb = np.empty((T, 2 * I), np.int8)
    xc = np.empty((T, I // BLOCK * (CH // 4)), np.int32)
    vnni_layout(xq, xb, xc)
    return xb, xs, xc


def dequantize_rows(q: np.ndarray, scale: np.ndarray, out: np.ndarray, parallel: bool = True) -> None:
    """q int8 [n, I], scale f32 [n] -> out f32 [n, I] = q * scale[:, None], each value rounded once as
    torch's widen-then-scale rounds it: a prompt's block of int8 weight rows before its fp32 GEMM, in one
    pass over the block (torch's copy then multiply took two: K2's dense gate, 18432 x 7168, 22 -> 12
    ms a layer on a 2-core Xeon, against ~200 ms of GEMM). parallel=False: on the calling thread alone,
    where a second parallel region beside the expert kernels' may not run."""
    if q.dtype != np.int8 or q.ndim != 2 or scale.dtype != np.float32 or scale.shape != (q.shape[0],) \
            or out.dtype != np.float32 or out.shape != q.shape or not out.flags.c_contiguous:
        raise ValueError(f"dequantize_rows: want q int8 [n, I], scale float32 [n] and a contiguous float32 out "
                         f"[n, I], got q {q.dtype} {q.shape}, scale {scale.dtype} {scale.shape}, out {out.dtype} "
                         f"{out.shape}")
    (_dequantize if parallel else _dequantize_serial)(q, scale, out)


@njit(nogil=True, cache=True, inline="always")
def _dequantize_row(q, scale, out, r):
    s = scale[r]
    for i in range(q.shape[1]):
        out[r, i] = np.float32(q[r, i]) * s


@njit(nogil=True, cache=True, parallel=True)
def _dequantize(q, scale, out):
    for r in prange(q.shape[0]):
        _dequantize_row(q, scale, out, r)


@njit(nogil=True, cache=True)
def _dequantize_serial(q, scale, out):
    for r in range(q.shape[0]):
        _dequantize_row(q, scale, out, r)


@njit(nogil=True, cache=True)
def vnni_layout(xq, xb, xc):
    """xq int16 [T, I] (quantize_blocks' codes) -> what the VNNI kernel reads: xb int8 [T, 2 I], per CH
    columns their codes' high bytes h (signed) then low bytes l (a = 256 h + l, l in [0, 255], stored as
    its bits); xc int32 [T, I // 4 // (BLOCK // CH)]: per block, int32 lane i's -128 * sum of the h it
    multiplies (columns 4i..4i+3 of each CH in the block), where that lane's high-byte sum starts."""
    T, I = xq.shape
    lanes = CH // 4
    for t in range(T):
        for c in range(I // CH):
            base = (c * CH // BLOCK) * lanes
            if c % (BLOCK // CH) == 0:
                for i in range(lanes):
                    xc[t, base + i] = 0
            for j in range(CH):  # the bytes first, then each lane's sum of its 4 h: a loop that vectorises
                a = np.int32(xq[t, c * CH + j])
                h = a >> 8
                xb[t, 2 * CH * c + j] = h
                xb[t, 2 * CH * c + CH + j] = np.int8(np.uint8(a - 256 * h))
            for i in range(lanes):
                k = 2 * CH * c + 4 * i
                xc[t, base + i] -= 128 * (np.int32(xb[t, k]) + np.int32(xb[t, k + 1]) + np.int32(xb[t, k + 2])
                                          + np.int32(xb[t, k + 3]))


def make_rows_kernel(R: int, ahead: int = 0):
    """An intrinsic rows(w, wstride, xq, xs, xc, nblk, res) -> None: res f32 [r] = sum over the nblk blocks
    of xs[b] * (int8 row r . the codes over block b), for the R rows at w + r * wstride (bytes; any
    alignment). One token: xq its int16 codes (quantize_blocks), or with VNNI their bytes (vnni_layout,
    whose lane offsets are xc; unread otherwise); xs its f32 block scales; addresses as intp.
    Each block prefetches the same columns of the next PF_BLOCKS blocks of R rows, or with ahead > 0
    the bytes `ahead` past it (rows read in memory order: one stream, STREAM_AHEAD)."""
    L = vector_lanes()  # int16 lanes per vector: 32 (zmm) or 16 (ymm)
    VF = ir.VectorType(F32, L // 2)

    @intrinsic
    def rows(typingctx, w, wstride, xq, xs, xc, nblk, res):
        sig = types.void(*([types.intp] * 7))

        def codegen(context, b, signature, args):
            w, wstride, xq, xs, xc, nblk, res = args
            facc = [cgutils.alloca_once_value(b, ir.Constant(VF, None)) for _ in range(R)]
            rows_at = [b.add(w, b.mul(ir.Constant(I64, r), wstride)) for r in range(R)]
            dist = ir.Constant(I64, ahead) if ahead else b.mul(ir.Constant(I64, R * PF_BLOCKS), wstride)
            with cgutils.for_range(b, nblk) as blk:
                c0 = b.mul(blk.index, ir.Constant(I64, BLOCK))
                for r in range(R):
                    for line in range(0, BLOCK, 64):
                        prefetch_l2(b, b.add(b.add(rows_at[r], dist), b.add(c0, ir.Constant(I64, line))))
                scale_block(b, L, block_sums(b, L, rows_at, xq, xc, blk.index, c0), xs, blk.index, facc)
            for r in range(R):
                b.store(hsum(b, b.load(facc[r])), b.inttoptr(b.add(res, ir.Constant(I64, 4 * r)), F32.as_pointer()))
            return context.get_dummy_value()

        return sig, codegen

    return rows


def scale_block(b, L, iacc, xs, blk, facc):
    """Per row r: facc[r] (an <L/2 x float> alloca) += fp32(iacc[r]) * the block's activation scale
    (f32 at address xs + 4 blk), lane by lane: the order every int8 kernel keeps (int8gemm's tiles too),
    so that their outputs agree bit for bit."""
    VF = ir.VectorType(F32, L // 2)
    fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(VF, [VF] * 3), f"llvm.fma.v{L // 2}f32")
    sp = b.load(b.inttoptr(b.add(xs, b.mul(blk, ir.Constant(I64, 4))), F32.as_pointer()))
    sv = b.insert_element(ir.Constant(VF, None), sp, ir.Constant(I32, 0))
    sv = b.shuffle_vector(sv, sv, ir.Constant(ir.VectorType(I32, L // 2), [0] * (L // 2)))
    for r, acc in enumerate(iacc):
        b.store(b.call(fma, [b.sitofp(acc, VF), sv, b.load(facc[r])]), facc[r])


def block_sums(b, L, rows_at, xq, xc, blk, c0):
    """One block's int32 lane sums for each row at rows_at (addresses from which column c lies at + c), from
    the token's codes at xq (and lane offsets xc): _vnni_block's where the CPU has VNNI, else _madd_block's."""
    return (_vnni_block if VNNI else _madd_block)(b, L, rows_at, xq, xc, blk, c0)


def _madd_block(b, L, rows_at, xq, xc, blk, c0):
    """One block's int32 lane sums per row, vpmaddwd: a sign-extended vector of codes times L int16."""
    VB, VW, VD = ir.VectorType(I8, L), ir.VectorType(I16, L), ir.VectorType(I32, L // 2)
    name = "llvm.x86.avx2.pmadd.wd" if L == 16 else "llvm.x86.avx512.pmaddw.d.512"
    madd = cgutils.get_or_insert_function(b.module, ir.FunctionType(VD, [VW, VW]), name)
    iacc = [ir.Constant(VD, None)] * len(rows_at)
    for j in range(BLOCK // L):
        col = b.add(c0, ir.Constant(I64, j * L))
        xv = b.load(b.inttoptr(b.add(xq, b.mul(col, ir.Constant(I64, 2))), VW.as_pointer()), align=1)
        for r, at in enumerate(rows_at):
            wv = b.load(b.inttoptr(b.add(at, col), VB.as_pointer()), align=1)
            iacc[r] = b.add(iacc[r], b.call(madd, [b.sext(wv, VW), xv]))
    return iacc


def _vnni_block(b, L, rows_at, xq, xc, blk, c0):
    """The same sums through vpdpbusd over vnni_layout's bytes: per row a high-byte accumulator (codes
    + 128 against h, starting at the block's lane offsets) and a low-byte one (l against the codes),
    (high << 8) + low at the end."""
    VD, VC = ir.VectorType(I32, L // 2), ir.VectorType(I8, CH)
    dp = cgutils.get_or_insert_function(b.module, ir.FunctionType(VD, [VD] * 3), f"llvm.x86.avx512.vpdpbusd.{16 * L}")
    flip = ir.Constant(VC, [ir.Constant(I8, -128)] * CH)
    start = b.load(b.inttoptr(b.add(xc, b.mul(blk, ir.Constant(I64, CH))), VD.as_pointer()), align=1)  # CH/4 int32
    hi, lo = [start] * len(rows_at), [ir.Constant(VD, None)] * len(rows_at)
    for j in range(BLOCK // CH):
        col = b.add(c0, ir.Constant(I64, j * CH))
        xh = b.load(b.inttoptr(b.add(xq, b.mul(col, ir.Constant(I64, 2))), VD.as_pointer()), align=1)
        xl = b.load(b.inttoptr(b.add(xq, b.add(b.mul(col, ir.Constant(I64, 2)), ir.Constant(I64, CH))),
                               VD.as_pointer()), align=1)
        for r, at in enumerate(rows_at):
            wv = b.load(b.inttoptr(b.add(at, col), VC.as_pointer()), align=1)
            hi[r] = b.call(dp, [hi[r], b.bitcast(b.xor(wv, flip), VD), xh])
            lo[r] = b.call(dp, [lo[r], xl, b.bitcast(wv, VD)])
    eight = ir.Constant(VD, [ir.Constant(I32, 8)] * (L // 2))
    return [b.add(b.shl(h, eight), l_) for h, l_ in zip(hi, lo)]
