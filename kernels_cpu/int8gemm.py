"""A prompt's product with int8 weight rows in integers on AVX2: int8 codes x int16 activation codes.

Owns int8_gemm, the prefill side of the int8 GEMV (widen.gemv_i8_into) on ymm CPUs without VNNI
(Zen 3, Haswell to Skylake desktop), where the int8 GEMV's own kernel is vpmaddwd: the same activation
codes (int8dot.quantize_blocks: 15 bits and one fp32 scale per BLOCK columns), the same exact int32
sum per block, converted and scaled in the same lane order, so every output equals the GEMV's bit
for bit. What changes is the reuse: a tile of ROWS rows x TOKENS tokens sign-extends each vector of
weights once for its TOKENS tokens and loads each vector of activations once for its ROWS rows, so
16 weights x a token cost one vpmaddwd and one add where an fp32 GEMM over dequantised rows spends
two FMAs. Before this a prompt's int8 rows were dequantised to fp32 a block at a time for oneDNN's
fp32 GEMM. Pure functions on arrays; imports nothing from hybrid/.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.int8dot import BLOCK, quantize_token, scale_block
from kernels_cpu.simd import F32, I8, I16, I32, I64, has_vnni, host_has_avx2, hsum, vector_lanes
from kernels_cpu.widen import bf16_to_f32
from kernels_cpu.workqueue import new_queue, take

# rows x tokens of a tile. K2's shapes, 128 tokens, AVX2 code on a 2-core Xeon (GFLOP/s, torch's fp32
# GEMM over dequantised rows 173-180 in the same sitting): 4 x 4 194-206, 6 x 4 204, 8 x 4 193, 4 x 8
# 188, 4 x 2 167-178, 2 x 4 154-176. LLVM keeps a block's sign-extended weights on the stack and
# reloads them per token; a loop over the chunks instead, or weights widened to int16 beforehand,
# spilled the accumulators and measured no better.
ROWS, TOKENS = 4, 4
RB = 32  # weight rows per work item
# rows of x up to which the tiles beat the fp32 GEMM over dequantised rows, whose dequantisation is
# shared by more rows the longer the prompt. GFLOP/s, AVX2 code, same Xeon, int8 tiles against fp32 at
# 128 / 256 / 384 / 512 rows: 12288 x 1536 164 / 173 / 180 / 175 against 135 / 157 / 178 / 173;
# 18432 x 7168 188 / 195 / 202 / 191 against 154 / 178 / 184 / 179; 7168 x 18432 184 / 188 / 176 / 182
# against 162 / 180 / 178 / 184; and a k2-slice pp512 (one pass) measured ~3% slower through the tiles
MAX_ROWS = 256
# tokens a work item's rows pass over at a time: their codes (7168 columns: 448 KB) stay in L2. 512 tokens
# of K2's q_a shape, the same Xeon: all at once 157-163 GFLOP/s, 16 176-186, 32 183-185, 64 176-182
TB = 32
_L = 16  # int16 lanes of a ymm vector: the only width this path runs at (available)


def available() -> bool:
    """ymm vectors without VNNI: where the int8 GEMV's kernel is vpmaddwd. With AVX-512 VNNI the same
    tiles through vpdpwssd measured level with oneDNN's AVX-512 fp32 GEMM (222-229 against 225-247
    GFLOP/s), so those CPUs keep it."""
    return host_has_avx2() and vector_lanes() == _L and not has_vnni()


def make_tile_kernel(R: int, TT: int):
    """An intrinsic tile(w, wstride, xq, xstride, xs, sstride, nblk, res) -> None: res f32 [TT, R] =
    per token t and row r the sum over the nblk blocks of xs[t, b] * (int8 row r . token t's int16
    codes over block b). Rows at w + r * wstride, codes at xq + t * xstride, scales at xs + t * sstride
    (bytes, any alignment); addresses as intp. The per-row order of int8dot's vpmaddwd row kernel."""
    VB, VW, VD, VF = (ir.VectorType(I8, _L), ir.VectorType(I16, _L), ir.VectorType(I32, _L // 2),
                      ir.VectorType(F32, _L // 2))

    @intrinsic
    def tile(typingctx, w, wstride, xq, xstride, xs, sstride, nblk, res):
        sig = types.void(*([types.intp] * 8))

        def codegen(context, b, signature, args):
            w, wstride, xq, xstride, xs, sstride, nblk, res = args
            madd = cgutils.get_or_insert_function(b.module, ir.FunctionType(VD, [VW, VW]), "llvm.x86.avx2.pmadd.wd")
            facc = [[cgutils.alloca_once_value(b, ir.Constant(VF, None)) for _ in range(R)] for _ in range(TT)]
            rows_at = [b.add(w, b.mul(ir.Constant(I64, r), wstride)) for r in range(R)]
            toks_at = [b.add(xq, b.mul(ir.Constant(I64, t), xstride)) for t in range(TT)]
            scales_at = [b.add(xs, b.mul(ir.Constant(I64, t), sstride)) for t in range(TT)]
            with cgutils.for_range(b, nblk) as blk:
                c0 = b.mul(blk.index, ir.Constant(I64, BLOCK))
                iacc = [[ir.Constant(VD, None)] * R for _ in range(TT)]
                for j in range(BLOCK // _L):
                    col = b.add(c0, ir.Constant(I64, j * _L))
                    xv = [b.load(b.inttoptr(b.add(at, b.mul(col, ir.Constant(I64, 2))), VW.as_pointer()), align=1)
                          for at in toks_at]
                    for r, at in enumerate(rows_at):
                        wv = b.sext(b.load(b.inttoptr(b.add(at, col), VB.as_pointer()), align=1), VW)
                        for t in range(TT):
                            iacc[t][r] = b.add(iacc[t][r], b.call(madd, [wv, xv[t]]))
                for t in range(TT):
                    scale_block(b, _L, iacc[t], scales_at[t], blk.index, facc[t])
            for t in range(TT):
                for r in range(R):
                    b.store(hsum(b, b.load(facc[t][r])),
                            b.inttoptr(b.add(res, ir.Constant(I64, 4 * (t * R + r))), F32.as_pointer()))
            return context.get_dummy_value()

        return sig, codegen

    return tile


_tile, _tile_rows, _tile_toks, _tile_one = (make_tile_kernel(ROWS, TOKENS), make_tile_kernel(ROWS, 1),
                                            make_tile_kernel(1, TOKENS), make_tile_kernel(1, 1))


@njit(nogil=True, cache=True, inline="always")
def _item(xq, xs, w, s, out, lo, hi, res):
    # rows lo..hi-1 of out f32 [T, O] for every token, TB tokens at a time (their codes stay in L2 while
    # the rows pass): ROWS x TOKENS tiles, a last row or token alone
    T, I = xq.shape[0], w.shape[1]
    nb, xst, sst = I // BLOCK, 2 * I, 4 * xs.shape[1]
    for t0 in range(0, T, TB):
        t1 = min(T, t0 + TB)
        o = lo
        while o < hi:
            n = ROWS if o + ROWS <= hi else 1
            t = t0
            while t < t1:
                m = TOKENS if t + TOKENS <= t1 else 1
                at, xt, st = w.ctypes.data + I * o, xq.ctypes.data + xst * t, xs.ctypes.data + sst * t
                if n == ROWS and m == TOKENS:
                    _tile(at, I, xt, xst, st, sst, nb, res.ctypes.data)
                elif n == ROWS:
                    _tile_rows(at, I, xt, xst, st, sst, nb, res.ctypes.data)
                elif m == TOKENS:
                    _tile_toks(at, I, xt, xst, st, sst, nb, res.ctypes.data)
                else:
                    _tile_one(at, I, xt, xst, st, sst, nb, res.ctypes.data)
                for k in range(m):
                    for r in range(n):
                        out[t + k, o + r] = res[k * n + r] * bf16_to_f32(s[o + r])
                t += m
            o += n


@njit(nogil=True, cache=True, parallel=True)
def _gemm(x, w, s, out, nt):
    T, I = x.shape
    xq = np.empty((T, I), np.int16)
    xs = np.empty((T, I // BLOCK), np.float32)
    for t in prange(T):
        quantize_token(x, xq, xs, t)
    n = (w.shape[0] + RB - 1) // RB
    queue = new_queue(nt)
    for th in prange(nt):
        res = np.empty(ROWS * TOKENS, np.float32)
        it = take(queue, n, th, nt)
        while it < n:
            _item(xq, xs, w, s, out, it * RB, min(w.shape[0], it * RB + RB), res)
            it = take(queue, n, th, nt)


def int8_gemm(x: np.ndarray, q: np.ndarray, scale: np.ndarray, nt: int) -> np.ndarray:
    """x f32 [T, I] @ (q int8 [O, I] * scale[:, None]).T -> f32 [T, O], scale bf16 [O] as uint16
    bits, on nt threads: x quantised per token as the int8 GEMV quantises it, then the tiles. I must be
    a multiple of BLOCK, and available() true."""
    if x.dtype != np.float32 or x.ndim != 2 or q.dtype != np.int8 or q.ndim != 2 or x.shape[1] != q.shape[1] \
            or x.shape[1] % BLOCK or scale.dtype != np.uint16 or scale.shape != (q.shape[0],) \
            or not (x.flags.c_contiguous and q.flags.c_contiguous):
        raise ValueError(f"int8_gemm: want contiguous x float32 [T, I] and q int8 [O, I] with I a multiple of {BLOCK}"
                         f", and scale bf16 bits (uint16) [O]; got x {x.dtype} {x.shape}, q {q.dtype} {q.shape}, "
                         f"scale {scale.dtype} {scale.shape}")
    out = np.empty((x.shape[0], q.shape[0]), np.float32)
    _gemm(x, q, scale, out, nt)
    return out
