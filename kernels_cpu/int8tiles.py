"""The one-token int8 GEMV over a tile-major copy of the weights: widen.int8_gemv's product, read in an
order that keeps the activations the loop touches small.

Owns the layout (fits, usable, tiles_shape, logical_shape and dims, its form for @njit code; tile_rows and tile_into:
row-major int8 codes [O, I] -> tiles [O / TILE_ROWS, I / TILE_COLS, TILE_ROWS, TILE_COLS], each tile contiguous,
the tiles of a block of rows one after another; untile_into: a block of rows back; dequantize_tiles: a block of
rows in fp32), gemv_tiles_into (one or two weights in one parallel region, for the fused decode steps) and
int8_gemv_tiles (its checked form for Python).
Why: widen's GEMV reads a row at a time, one stream through the matrix, and each row reads the whole
token's activation codes (2 bytes a column: 14 KB at K2's 7168 columns) beside it; over tiles the
stream is still one, in memory order, but a row's TILE_COLS columns at a time, so the activations in use
are 1 KB. scripts/int8_layout_bench.py, 2-core Xeon VM, 900 MB a matrix, one sitting (probe 37.5-39.4
GB/s), row-major -> tiles: 7168 columns 31.7 -> 34.8 GB/s, 8192 31.3 -> 34.7, 18432 31.0 -> 33.0; 1536
33.9 -> 33.1, 2048 34.4 -> 33.0 (short rows read well already).

The sums: each row's TILE_COLS columns of a tile go into a fresh accumulator, in int8dot's blocks and
lanes, and its total is added to the row's sum, tile by tile; so the outputs differ from int8_gemv's
(one accumulator over the whole row) in the order of their fp32 additions, not in the codes or scales.
Continuing one accumulator over a row's tiles (int8_gemv's bits) read 75-79% of the probe, level with
the row-major GEMV, against 87-88% this way.

The engine holds int8w's CPU weights so where usable says (runtime/gpu_side.host_tiles, one copy: the
tiles replace the rows). Decode reads them here (attn_step, moe_step, token_step through linear_into and
pair_into; model/linear.py for the separate steps); a prompt's products read them in amx_gemm (AMX) and
through dequantize_tiles (the fp32 GEMM), and untile a block of rows at a time for int8gemm and bf16 prompt
math. k2-slice, int8w, 2-core Xeon VM, three interleaved bench pairs against the rows: decode 18.7 -> 19.6
tok/s (73.7-74.8 -> 76.9-77.8% of the probe; projections, dense and shared MLP 4-7% faster), prefill level.
Pure functions on arrays; imports nothing from hybrid/.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from kernels_cpu.int8dot import BLOCK, STREAM_AHEAD, block_sums, quantize_activations, scale_block
from kernels_cpu.simd import F32, I32, I64, host_has_avx2, hsum, prefetch_l2, vector_lanes
from kernels_cpu.widen import MAX_ROWS, bf16_to_f32, concurrent_parallel_ok
from kernels_cpu.workqueue import new_queue, take

TILE_ROWS = 8
TILE_COLS = 512  # columns of a tile: 4 blocks of BLOCK


def fits(O: int, I: int) -> bool:
    """The shapes tile_rows takes: whole tiles of rows and of columns."""
    return O > 0 and I > 0 and O % TILE_ROWS == 0 and I % TILE_COLS == 0


def tiles_shape(O: int, I: int) -> tuple[int, int, int, int]:
    """The 4-D shape of int8 codes [O, I] (fits) as tiles."""
    return O // TILE_ROWS, I // TILE_COLS, TILE_ROWS, TILE_COLS


def logical_shape(w) -> tuple[int, int]:
    """A weight's [O, I] as the products see it (a numpy array or a torch tensor): its shape, or for tiles
    (4-D) the codes' they hold."""
    return (w.shape[0] * w.shape[2], w.shape[1] * w.shape[3]) if w.ndim == 4 else (w.shape[0], w.shape[1])


def dims(w):
    """For @njit code: logical_shape's (O, I) of a weight, rows or tiles (resolved when Numba compiles)."""
    raise NotImplementedError


@overload(dims, inline="always")
def _dims_impl(w):
    if w.ndim == 4:
        return lambda w: (w.shape[0] * w.shape[2], w.shape[1] * w.shape[3])
    return lambda w: (w.shape[0], w.shape[1])


def usable(O: int, I: int) -> bool:
    """Whether a weight of this shape may be held as tiles here: it fits, the CPU runs the tile kernel (AVX2),
    and its parallel region may run beside the expert kernels' (widen.concurrent_parallel_ok)."""
    return fits(O, I) and host_has_avx2() and concurrent_parallel_ok()


def tile_rows(q: np.ndarray) -> np.ndarray:
    """int8 codes [O, I] (fits) -> a new contiguous int8 [O / TILE_ROWS, I / TILE_COLS, TILE_ROWS, TILE_COLS]:
    tile [b, c] holds rows b * TILE_ROWS.. and columns c * TILE_COLS.. of q, row by row."""
    if q.dtype != np.int8 or q.ndim != 2 or not fits(*q.shape):
        raise ValueError(f"tile_rows: want int8 codes [O, I] with O a multiple of {TILE_ROWS} and I of {TILE_COLS}, "
                         f"got {q.dtype} {q.shape}")
    O, I = q.shape
    tiles = np.empty(tiles_shape(O, I), np.int8)
    tile_into(np.ascontiguousarray(q), tiles)
    return tiles


@njit(nogil=True, cache=True, parallel=True)
def tile_into(q, tiles):
    """q int8 [O, I] -> tiles (tile_rows' layout, written), a block of rows a thread at a time: at memory
    speed, where numpy's transposing copy moved 0.4 GB/s (the engine tiles K2's int8 weights at load)."""
    for rb in prange(tiles.shape[0]):
        for c in range(tiles.shape[1]):
            for r in range(TILE_ROWS):
                tiles[rb, c, r, :] = q[rb * TILE_ROWS + r, c * TILE_COLS:(c + 1) * TILE_COLS]


@njit(nogil=True, cache=True, parallel=True)
def untile_into(tiles, lo, out):
    """Rows lo.. of the codes tiles hold (lo a multiple of TILE_ROWS) -> out int8 [n, I] (n a multiple of
    TILE_ROWS): a prompt's block of rows for the row-major product kernels."""
    for k in prange(out.shape[0] // TILE_ROWS):
        rb = lo // TILE_ROWS + k
        for c in range(tiles.shape[1]):
            for r in range(TILE_ROWS):
                out[k * TILE_ROWS + r, c * TILE_COLS:(c + 1) * TILE_COLS] = tiles[rb, c, r, :]


def dequantize_tiles(tiles: np.ndarray, scale: np.ndarray, lo: int, out: np.ndarray, parallel: bool = True) -> None:
    """Rows lo..lo + n - 1 of the codes tiles hold, times their fp32 row scales scale [O] -> out f32 [n, I]: what
    int8dot.dequantize_rows gives for those rows (the same product, rounded once), read from the tiles.
    parallel=False: on the calling thread alone (as dequantize_rows)."""
    O, I = logical_shape(tiles) if tiles.ndim == 4 else (-1, -1)
    if tiles.ndim != 4 or tiles.dtype != np.int8 or scale.dtype != np.float32 or scale.shape != (O,) \
            or out.dtype != np.float32 or out.ndim != 2 or out.shape[1] != I or not 0 <= lo <= O - out.shape[0] \
            or not out.flags.c_contiguous:
        raise ValueError(f"dequantize_tiles: want tiles of int8 codes, scale float32 [O] and a contiguous float32 "
                         f"out [n, I] within the rows, got tiles {tiles.dtype} {tiles.shape}, scale {scale.dtype} "
                         f"{scale.shape}, lo {lo}, out {out.dtype} {out.shape}")
    (_dequantize if parallel else _dequantize_serial)(tiles, scale, lo, out)


@njit(nogil=True, cache=True, inline="always")
def _dequantize_row(tiles, scale, lo, out, r):
    rb, rr, s = (lo + r) // TILE_ROWS, (lo + r) % TILE_ROWS, scale[lo + r]
    for c in range(tiles.shape[1]):
        for i in range(TILE_COLS):
            out[r, c * TILE_COLS + i] = np.float32(tiles[rb, c, rr, i]) * s


@njit(nogil=True, cache=True, parallel=True)
def _dequantize(tiles, scale, lo, out):
    for r in prange(out.shape[0]):
        _dequantize_row(tiles, scale, lo, out, r)


@njit(nogil=True, cache=True)
def _dequantize_serial(tiles, scale, lo, out):
    for r in range(out.shape[0]):
        _dequantize_row(tiles, scale, lo, out, r)


@intrinsic
def _tile_rows_dot(typingctx, w, nch, xq, xs, xc, res):
    """One block of TILE_ROWS rows (w: its first tile; nch tiles of columns) against one token's codes (xq,
    xs, xc: int8dot.quantize_activations' row, addresses) -> res f32 [TILE_ROWS]: each row's tiles summed
    apart (int8dot's blocks into one lane accumulator, its lanes then summed) and added in tile order.
    Prefetches the bytes STREAM_AHEAD past each block it reads into L2 (the tiles are one stream)."""
    sig = types.void(*([types.intp] * 6))
    L = vector_lanes()
    VF = ir.VectorType(F32, L // 2)
    per = TILE_COLS // BLOCK

    def codegen(context, b, signature, args):
        w, nch, xq, xs, xc, res = args
        zero = ir.Constant(VF, [ir.Constant(F32, 0.0)] * (L // 2))
        sums = cgutils.alloca_once(b, ir.ArrayType(F32, TILE_ROWS))  # each row's sum over its tiles so far
        for r in range(TILE_ROWS):
            b.store(ir.Constant(F32, 0.0), b.gep(sums, [ir.Constant(I32, 0), ir.Constant(I32, r)]))
        acc = cgutils.alloca_once_value(b, zero)  # the current row's tile, in a register
        with cgutils.for_range(b, nch) as chunk:
            c0 = b.mul(chunk.index, ir.Constant(I64, TILE_COLS))  # the tile's first column
            tile = b.add(w, b.mul(chunk.index, ir.Constant(I64, TILE_ROWS * TILE_COLS)))
            # the rows in a loop, not unrolled: unrolled, the compiler kept the tile's activations in
            # registers across the rows and spilled them (69% of the probe, 2-core Xeon)
            with cgutils.for_range(b, ir.Constant(I64, TILE_ROWS)) as row:
                slot = b.gep(sums, [ir.Constant(I32, 0), b.trunc(row.index, I32)])
                b.store(zero, acc)
                # a base from which column c of this row of the tile lies at base + c (the block kernels'
                # addressing: weight and activation offsets from one column index)
                at = b.sub(b.add(tile, b.mul(row.index, ir.Constant(I64, TILE_COLS))), c0)
                with cgutils.for_range(b, ir.Constant(I64, per)) as k:
                    blk = b.add(b.mul(chunk.index, ir.Constant(I64, per)), k.index)
                    col = b.mul(blk, ir.Constant(I64, BLOCK))
                    for line in range(0, BLOCK, 64):
                        prefetch_l2(b, b.add(b.add(at, col), ir.Constant(I64, STREAM_AHEAD + line)))
                    scale_block(b, L, block_sums(b, L, [at], xq, xc, blk, col), xs, blk, [acc])
                b.store(b.fadd(b.load(slot), hsum(b, b.load(acc))), slot)
        for r in range(TILE_ROWS):
            tot = b.load(b.gep(sums, [ir.Constant(I32, 0), ir.Constant(I32, r)]))
            b.store(tot, b.inttoptr(b.add(res, ir.Constant(I64, 4 * r)), F32.as_pointer()))
        return context.get_dummy_value()

    return sig, codegen


ITEM_BLOCKS = 2  # blocks of TILE_ROWS rows per work item
# Where the rest of RAM's rate goes: k2-slice's int8w weights in place (o_proj, q_b, q_a), 2-core Xeon VM, each call
# after a 512 MB read, 5-7 shuffled rounds a sitting. A read of the same bytes in this kernel's order with no
# arithmetic (one stream a thread over its rows, each line prefetched STREAM_AHEAD on) got 86-95% of membw's best
# read shape over them, and this kernel 93-96% of that read (o_proj, two sittings: 30.4-30.7 / 32.0-32.5 / 35.0-37.4
# GB/s; a third, in slower memory: 27.4 / 28.6 / 30.1). Slower or level, not kept: two streams a thread (its rows'
# halves, a tile of each in turn; or rows 512 KB apart within 1 MB items, 128 bytes of each in turn, as the best
# read shape reads): level as this kernel, -6 to -15% as plain reads; items of 1 MB taken in order by both threads
# (level); an L1 prefetch 0.5-2 KB on (-9 to -13%); every other line prefetched (-14 to -19%), or each 4 KB's first
# lines only (-11 to -24%); 4-12 KB ahead (level, one sitting unflushed); one activation scale a tile (a quarter of
# the conversions and products: level, alone and in the bench); both threads' row sums forced onto one cache line
# (no change: no false sharing); the weights loaded as two ymm halves, prefetched or not, and two long streams a
# thread without a prefetch, as membw's best shape reads (29.9-30.7 against 30.3-31.2 GB/s on o_proj, one sitting).
# One weight a call (no second weight's branch) read 4-16% faster alone in four sittings (identical inner loop,
# alignment and call cost: unexplained), but linear_into and pair_into on it left the bench level (four interleaved
# pairs: 78.3 against 77.4% of the in-place read). The best shape (ymm, two streams a thread) is itself the outlier:
# over o_proj in place, 15 reads, its median 36.2 and best 37.0 GB/s, membw's other two shapes 31.9 and 32.4.
# Unflushed, the host's 480 MB L3 serves part of a < 1 GB set of matrices: up to 95% of the best shape.


@njit(nogil=True, cache=True)
def _rows_block(xq, xs, xc, wt, s, out, rb, res):
    # rows rb * TILE_ROWS.. of out f32 [T, O] from the codes of x (quantize_activations), tiles wt, bf16 scales s
    nch = wt.shape[1]
    I = nch * TILE_COLS
    nb = I // BLOCK
    for t in range(xq.shape[0]):
        _tile_rows_dot(wt.ctypes.data + rb * TILE_ROWS * I, nch, xq.ctypes.data + 2 * I * t,
                       xs.ctypes.data + 4 * nb * t, xc.ctypes.data + 4 * xc.shape[1] * t, res.ctypes.data)
        for r in range(TILE_ROWS):
            o = rb * TILE_ROWS + r
            out[t, o] = res[r] * bf16_to_f32(s[o])


@njit(nogil=True, cache=True, parallel=True)
def gemv_tiles_into(xq, xs, xc, w1, s1, out1, w2, s2, out2, nt):
    """The rows of tiles w1 then of tiles w2 (w2 may be w1 with out2 [T, 0]: one weight) against x quantised by
    int8dot.quantize_activations (xq, xs, xc), on nt threads: widen.gemv_i8_into over tiles, for the fused
    decode steps (attn_step, moe_step) and int8_gemv_tiles."""
    n1 = (w1.shape[0] + ITEM_BLOCKS - 1) // ITEM_BLOCKS
    n = n1 + ((w2.shape[0] + ITEM_BLOCKS - 1) // ITEM_BLOCKS if out2.shape[1] else 0)
    queue = new_queue(nt)
    for th in prange(nt):
        res = np.empty(TILE_ROWS, np.float32)
        it = take(queue, n, th, nt)
        while it < n:
            if it < n1:
                for rb in range(it * ITEM_BLOCKS, min(w1.shape[0], it * ITEM_BLOCKS + ITEM_BLOCKS)):
                    _rows_block(xq, xs, xc, w1, s1, out1, rb, res)
            else:
                k = it - n1
                for rb in range(k * ITEM_BLOCKS, min(w2.shape[0], k * ITEM_BLOCKS + ITEM_BLOCKS)):
                    _rows_block(xq, xs, xc, w2, s2, out2, rb, res)
            it = take(queue, n, th, nt)


def int8_gemv_tiles(x: np.ndarray, tiles: np.ndarray, scale: np.ndarray, threads: int | None = None) -> np.ndarray:
    """widen.int8_gemv(x, q, scale) over tiles = tile_rows(q): x fp32 [T, I] (T <= widen.MAX_ROWS), scale bf16
    bits as uint16 [O] -> fp32 [T, O] (its sums in tile order: see the module doc); threads: Numba's count
    now where None. Needs AVX2 (widen's int8 kernels)."""
    if not host_has_avx2():
        raise RuntimeError("int8_gemv_tiles: the tile kernel needs an x86-64 CPU with AVX2 and FMA; use "
                           "kernels_cpu.widen.int8_gemv over the row-major codes")
    if tiles.dtype != np.int8 or tiles.ndim != 4 or tiles.shape[2:] != (TILE_ROWS, TILE_COLS) \
            or not tiles.flags.c_contiguous:
        raise ValueError(f"int8_gemv_tiles: want tiles from tile_rows (contiguous int8 [O / {TILE_ROWS}, I / "
                         f"{TILE_COLS}, {TILE_ROWS}, {TILE_COLS}]), got {tiles.dtype} {tiles.shape}")
    O, I = logical_shape(tiles)
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != I or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"int8_gemv_tiles: want x float32 [T, {I}] with 1 <= T <= {MAX_ROWS}, got {x.dtype} "
                         f"{x.shape}")
    if scale.dtype != np.uint16 or scale.shape != (O,):
        raise ValueError(f"int8_gemv_tiles: want scale uint16 (bf16 bits) [{O}], got {scale.dtype} {scale.shape}")
    xq, xs, xc = quantize_activations(np.ascontiguousarray(x))
    out = np.empty((x.shape[0], O), np.float32)
    gemv_tiles_into(xq, xs, xc, tiles, scale, out, tiles, scale, out[:, :0], threads or get_num_threads())
    return out
