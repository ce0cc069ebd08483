"""fp32 prompt products over bf16 weights through AMX's bf16 tiles, exact to fp32's summation: "bf16x3".

Owns gemm_bf16x3 (x fp32 [T, I] @ w.T for bf16 w [O, I], or int8 codes with row scales: the codes
are exact in bf16, converted per block of rows, the scale applied to each finished sum). The GPU
side's prompt products on a CPU multiply fp32 activations by bf16 weights (model/linear.py, without
AMX, widens the weights to fp32 for an fp32 GEMM). A bf16 weight is exact in bf16, and an fp32
activation is exactly the sum of three bf16 values (8 + 8 + 8 significant bits): x1 = bf16(x),
x2 = bf16(x - x1), x3 = x - x1 - x2. Each
product of two bf16 values is exact in fp32 and tdpbf16ps sums in fp32, so
C += W x1 + W x2 + W x3, all three into one fp32 accumulator, is the fp32 product of the widened
weights up to summation order, as the widening GEMM is; and reads the weights as stored.

Tiles (palette 1, all 16 rows x 64 bytes): 0-3 the fp32 results of 2 x 2 blocks of 16 weight rows x
16 tokens; 4, 5 the two blocks of weight rows (32 bf16 of K, read in place, row stride of w); 6, 7
the two token blocks, in tdpbf16ps' pair layout: row kk holds the bf16 pair 2kk, 2kk + 1 of each of
16 tokens (pack_x3 writes it, per split, per 32 columns of K).

Blocking: GROUP_PAIRS x 32 tokens at a time, K in chunks of KC columns; per chunk those tokens'
packed activations (panels) and RB_GEMM weight rows stay in L2 while the threads walk their share of
the rows. The results live in yT [O, Tp] (fp32, Tp = T padded to a multiple of 32), loaded into the
tiles at each chunk's start and transposed into y [T, O] after the last.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from kernels_cpu.amx import TileOps, available, compiles_bf16
from kernels_cpu.bf16dot import f32_to_bf16
from kernels_cpu.int8tiles import TILE_COLS, TILE_ROWS, dims, logical_shape
from kernels_cpu.simd import I8, I32, I64
from kernels_cpu.widen import bf16_to_f32
from kernels_cpu.workqueue import new_queue, take

KC = 1024  # columns of K per chunk (a panel of 32 tokens: 32 x 1024 x 3 splits x 2 bytes = 192 KB; int8tiles: 2 tiles)
RB_GEMM = 32  # weight rows per tile step (two A tiles)
TB = 32  # tokens per tile step (two B tiles)
GROUP_PAIRS = 4  # token pairs whose panels a pass over the weights takes (4 x 192 KB: within a 2 MB L2)


@njit(nogil=True, cache=True)
def tile_config():
    """The tile configuration (palette 1, all eight tiles 16 rows x 64 bytes); also mla_amx's."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    for t in range(8):
        cfg[16 + 2 * t] = 64  # bytes a row (uint16, little-endian)
        cfg[48 + t] = 16  # rows
    return cfg


def supported(O: int, I: int) -> bool:
    """Shapes the tile kernel takes: whole tiles of weight rows and of K."""
    return O % RB_GEMM == 0 and I % 32 == 0 and I > 0


@intrinsic
def _tile_step(typingctx, cfg, w, wstride, xp, nk, y, ystride, first):
    """32 weight rows (w, row stride wstride bytes) x 32 tokens over nk steps of 32 columns:
    xp the tokens' packed panel (3 splits x nk steps x 2 token blocks x 1 KB, see pack_x3's layout),
    y the fp32 results (row stride ystride bytes), added to (first == 0) or overwritten."""
    sig = types.void(*([types.intp] * 8))

    def codegen(context, b, signature, args):
        if not compiles_bf16():
            return context.get_dummy_value()
        cfg, w, wstride, xp, nk, y, ystride, first = args
        t = TileOps(b, "tdpbf16ps")
        c64 = ir.Constant(I64, 64)
        t.ldcfg(cfg)

        def cptr(r, tb):  # C tile (row block r, token block tb) in y
            return b.add(y, b.add(b.mul(ir.Constant(I64, 16 * r), ystride), ir.Constant(I64, 64 * tb)))

        with b.if_else(b.icmp_unsigned("!=", first, ir.Constant(I64, 0))) as (then, other):
            with then:
                for c in range(4):
                    t.zero(c)
            with other:
                for c in range(4):
                    t.load(c, cptr(c // 2, c % 2), ystride)
        step = ir.Constant(I64, 2 * 1024)  # one split's two token blocks per K step
        split = ir.Constant(I64, KC // 32 * 2 * 1024)
        with cgutils.for_range(b, nk) as loop:
            k = loop.index
            wk = b.add(w, b.mul(k, c64))
            t.load(4, wk, wstride)
            t.load(5, b.add(wk, b.mul(ir.Constant(I64, 16), wstride)), wstride)
            for s in range(3):
                xs = b.add(xp, b.add(b.mul(ir.Constant(I64, s), split), b.mul(k, step)))
                t.load(6, xs, c64)
                t.load(7, b.add(xs, ir.Constant(I64, 1024)), c64)
                for c in range(4):
                    t.dp(c, 4 + c // 2, 6 + c % 2)
        for c in range(4):
            t.store(c, cptr(c // 2, c % 2), ystride)
        t.release()
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True, inline="always")
def pair(lo, hi):
    """Two bf16 bit patterns in one uint32, lo in the low half: a row of tdpbf16ps' pair layout."""
    return np.uint32(lo) | (np.uint32(hi) << np.uint32(16))


@njit(nogil=True, cache=True, inline="always")
def split3(x):
    """fp32 x -> the bf16 bits of its three parts x1 = bf16(x), x2 = bf16(x - x1), x3 = bf16(x - x1 - x2),
    whose sum is x exactly (the module doc)."""
    a1 = f32_to_bf16(x)
    r = x - bf16_to_f32(a1)
    a2 = f32_to_bf16(r)
    return a1, a2, f32_to_bf16(r - bf16_to_f32(a2))


@njit(nogil=True, cache=True, parallel=True)
def pack_x3(x, Tp):
    """x fp32 [T, I] -> the tile kernel's panels: uint32 (two bf16) [I/KC chunks, Tp/32 token pairs, 3
    splits, KC/32 steps, 2 token blocks, 16 rows kk, 16 tokens n], row kk holding the parts of
    columns 2kk and 2kk + 1 of the step (low half, high half); tokens past T are zero."""
    T, I = x.shape
    nc = (I + KC - 1) // KC
    xp = np.empty((nc, Tp // TB, 3, KC // 32, 2, 16, 16), np.uint32)
    for t in range(T, Tp):  # the padding tokens (their columns of the last chunk's tail are never read)
        xp[:, t // TB, :, :, (t % TB) // 16, :, t % 16] = 0
    for t in prange(T):
        t2, tb, n = t // TB, (t % TB) // 16, t % 16
        for i in range(0, I, 2):
            c, k, kk = i // KC, (i % KC) // 32, (i % 32) // 2
            a1, a2, a3 = split3(x[t, i])
            b1, b2, b3 = split3(x[t, i + 1])
            xp[c, t2, 0, k, tb, kk, n] = pair(a1, b1)
            xp[c, t2, 1, k, tb, kk, n] = pair(a2, b2)
            xp[c, t2, 2, k, tb, kk, n] = pair(a3, b3)
    return xp


def _rows_a(w, o, k0, nk, ab):
    """(address, row stride in bytes) of the tile kernel's A: 32 weight rows from row o, column k0.
    bf16 weights are read in place; int8 codes (exact in bf16) are converted into ab first, from rows or
    from int8tiles' tiles (a row's TILE_COLS columns contiguous in each tile; k0 and the chunk's end on
    whole tiles: KC is a multiple of TILE_COLS). Numba only."""
    raise NotImplementedError


@overload(_rows_a, inline="always")
def _rows_a_impl(w, o, k0, nk, ab):
    if w.ndim == 4:
        def tiles(w, o, k0, nk, ab):
            nch = w.shape[1]
            for r in range(RB_GEMM):
                rb, rr = (o + r) // TILE_ROWS, (o + r) % TILE_ROWS
                dst = ab.ctypes.data + r * ab.shape[1] * 2
                for c in range(k0 // TILE_COLS, (k0 + 32 * nk + TILE_COLS - 1) // TILE_COLS):
                    n = min(TILE_COLS, k0 + 32 * nk - c * TILE_COLS) // 32
                    _codes_to_bf16(w.ctypes.data + ((rb * nch + c) * TILE_ROWS + rr) * TILE_COLS, n,
                                   dst + (c * TILE_COLS - k0) * 2)
            return ab.ctypes.data, ab.shape[1] * 2
        return tiles

    def rows(w, o, k0, nk, ab):
        I = w.shape[1]
        if w.itemsize == 2:
            return w.ctypes.data + (o * I + k0) * 2, I * 2
        for r in range(RB_GEMM):
            _codes_to_bf16(w.ctypes.data + (o + r) * I + k0, nk, ab.ctypes.data + r * ab.shape[1] * 2)
        return ab.ctypes.data, ab.shape[1] * 2
    return rows


@intrinsic
def _codes_to_bf16(typingctx, src, nk, dst):
    """nk x 32 int8 codes at src -> their bf16 bits at dst (exact: small integers), 32 a step."""
    sig = types.void(types.intp, types.intp, types.intp)

    def codegen(context, b, signature, args):
        src, nk, dst = args
        V8, VF = ir.VectorType(I8, 32), ir.VectorType(ir.FloatType(), 32)
        V32, V16 = ir.VectorType(I32, 32), ir.VectorType(ir.IntType(16), 32)
        with cgutils.for_range(b, nk) as loop:
            v = b.load(b.inttoptr(b.add(src, b.mul(loop.index, ir.Constant(I64, 32))), V8.as_pointer()), align=1)
            bits = b.lshr(b.bitcast(b.sitofp(v, VF), V32), ir.Constant(V32, [ir.Constant(I32, 16)] * 32))
            out = b.inttoptr(b.add(dst, b.mul(loop.index, ir.Constant(I64, 64))), V16.as_pointer())
            b.store(b.trunc(bits, V16), out, align=2)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True, parallel=True)
def _gemm(w, scale, xp, yT, y, cfg, nt):
    # w uint16 [O, I] (bf16 bits) or int8 codes (rows, or int8tiles' tiles) with fp32 row scales scale [O] (else empty);
    # xp pack_x3's panels, yT f32 [O, Tp] the tiles' results; y f32 [T, O] gets them transposed (and
    # scaled) as each block of rows finishes, while they are in cache
    O, I = dims(w)
    Tp, T = yT.shape[1], y.shape[0]
    nrb, ntp = O // RB_GEMM, Tp // TB
    nc = xp.shape[0]
    for g0 in range(0, ntp, GROUP_PAIRS):  # a group of token pairs at a time: their panels stay in L2
        g1 = min(ntp, g0 + GROUP_PAIRS)
        for c in range(nc):
            k0 = c * KC
            nk = (min(I, k0 + KC) - k0) // 32
            queue = new_queue(nt)
            for th in prange(nt):
                ab = np.empty((RB_GEMM, KC if w.itemsize == 1 else 0), np.uint16)
                it = take(queue, nrb, th, nt)
                while it < nrb:
                    o = it * RB_GEMM
                    a, astride = _rows_a(w, o, k0, nk, ab)
                    for t2 in range(g0, g1):
                        _tile_step(cfg.ctypes.data, a, astride, xp[c, t2].ctypes.data, nk,
                                   yT.ctypes.data + (o * Tp + t2 * TB) * 4, Tp * 4, 1 if c == 0 else 0)
                    if c == nc - 1:
                        for t in range(g0 * TB, min(T, g1 * TB)):
                            for r in range(RB_GEMM):
                                y[t, o + r] = yT[o + r, t] * scale[o + r] if scale.size else yT[o + r, t]
                    it = take(queue, nrb, th, nt)


_CFG = tile_config()


def gemm_bf16x3(x: np.ndarray, w: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """x fp32 [T, I] @ w.T -> fp32 [T, O]: w the bits of bf16 weights (uint16 [O, I], C-contiguous), or
    int8 codes [O, I] with fp32 row scales `scale` [O] (x @ (codes * scale).T), the codes as rows or as
    kernels_cpu.int8tiles' tiles (4-D; the same products in the same order, so the same bits). Needs
    amx.available(bf16=True) and supported(O, I)."""
    if not available(bf16=True):  # also what asks Linux for the tile state: without it, SIGILL
        raise RuntimeError("gemm_bf16x3 needs AMX-BF16 tiles, which this CPU or process does not have")
    T, I = x.shape
    tiled = w.ndim == 4 and w.dtype == np.int8 and w.shape[2:] == (TILE_ROWS, TILE_COLS)
    O, In = logical_shape(w) if tiled else (w.shape[0], w.shape[-1])
    int8 = w.dtype == np.int8 and scale is not None and scale.shape == (O,)
    if not supported(O, I) or not (w.dtype == np.uint16 and scale is None or int8) or not w.flags.c_contiguous \
            or (w.ndim != 2 and not tiled) or In != I:
        raise ValueError(f"gemm_bf16x3: x [T, I] and C-contiguous w [O, I] (uint16 bf16 bits, or int8 codes with "
                         f"[O] scales) with O % {RB_GEMM} == 0 and I % 32 == 0; got {x.shape} and {w.dtype} {w.shape}")
    Tp = (T + TB - 1) // TB * TB
    xp = pack_x3(np.ascontiguousarray(x, dtype=np.float32), Tp)
    yT = np.empty((O, Tp), np.float32)
    y = np.empty((T, O), np.float32)
    s = np.ascontiguousarray(scale, dtype=np.float32) if int8 else np.empty(0, np.float32)
    _gemm(w, s, xp, yT, y, _CFG, get_num_threads())
    return y
