"""bf16 (or int8) weights, fp32 math: the GEMVs of the GPU side when it runs on the CPU.

Owns bf16_gemv and int8_gemv, and the fused forms a decode step calls to save a parallel region and a
trip through Python per product: gemv_pair (two weights, one input: q_a and kv_a) and swiglu_gemv (a
SwiGLU MLP in one call). The checkpoint's dense weights are bf16; holding them as fp32 doubles
the RAM they take and the bytes every decoded token reads, for no gain in accuracy (bf16 -> fp32 is
exact). bf16_gemv reads the bf16 bits and widens them in registers (bits << 16), multiplying by
fp32 activations and summing in fp32, so the result equals the fp32 product up to summation order:
~2 bytes read per weight instead of 4. Where the input width is whole steps of bf16dot.PAIR (K2's
all are), a row at a time through bf16dot.row_dot, one stream at the RAM's speed; elsewhere Numba's
vectorised loop below. int8_gemv reads int8 weight-only codes with a bf16 scale per
row (gpu_precision 'int8', asked for on purpose: 1 byte a weight, int8's rounding). Where the input
width is a multiple of int8dot.BLOCK and the CPU has AVX2, its products (and the fused forms' over
int8) multiply the codes by the activations rounded to int16 per block (int8dot: widening each code to
fp32 for an FMA left the short rows compute-bound, K2's q_b_proj shape reading 10-11 GB/s on a 2-core
Xeon against 17-19 now, 1536x7168 12-18 against 21-22; 7168x18432 ~27 either way); with VNNI
through vpdpbusd (int8dot), 8 long rows from L2 56 -> 65 GB/s on a core, and K2's shapes from RAM
(two rounds, 2 threads) q_b 25.0-25.3 -> 25.2-26.9 GB/s, o_proj 28.2-28.6 -> 28.7-30.5, the shared
expert's 25.0-26.6 -> 25.8-27.8, the dense gate 29.4-30.3 -> 29.9-30.2. Elsewhere the codes are
widened to fp32 like the bf16 bits. Pure functions on arrays; imports nothing from hybrid/.
Letters: T rows of x, O out features, I in features.
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, threading_layer, types
from numba.extending import intrinsic, overload

from kernels_cpu import bf16dot
from kernels_cpu.bf16dot import deinterleave, row_dot
from kernels_cpu.int8dot import BLOCK, STREAM_AHEAD, make_rows_kernel, quantize_activations
from kernels_cpu.simd import host_has_avx2
from kernels_cpu.workqueue import new_queue, take

RB = 16  # output rows per work item
SHORT_ROW_BYTES = 4096  # rows of at most this many bytes are read one at a time (see _rows)
MAX_ROWS = 8  # rows of x per call: past this the product is compute-bound, a GEMM's job
# reassociation (a vectorised sum) and fused multiply-add; NaN and inf keep their meaning
FASTMATH = {"reassoc", "contract"}


@intrinsic
def bf16_to_f32(typingctx, bits):
    """uint16 bf16 bits -> float32 (the bits are the float's upper half)."""
    sig = types.float32(types.uint16)

    def codegen(context, b, signature, args):
        wide = b.shl(b.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return b.bitcast(wide, ir.FloatType())

    return sig, codegen


def widened3(a, i, j, k):
    """a[i, j, k] as float32: bf16 bits (uint16) widened, or a float32 value as it is. Numba only."""
    raise NotImplementedError


@overload(widened3, inline="always")
def _widened3_impl(a, i, j, k):
    if a.dtype == types.uint16:
        return lambda a, i, j, k: bf16_to_f32(a[i, j, k])
    return lambda a, i, j, k: a[i, j, k]


def _weight(w, o, i):
    """Weight w[o, i] as float32: bf16 bits (uint16) widened, or an int8 code. Numba only."""
    raise NotImplementedError


@overload(_weight, inline="always")
def _weight_impl(w, o, i):
    if w.dtype == types.uint16:
        return lambda w, o, i: bf16_to_f32(w[o, i])
    return lambda w, o, i: np.float32(w[o, i])


@njit(nogil=True, cache=True, inline="always")
def _scale(s, o):
    # row o's bf16 scale widened, or 1 where there are none (s.shape[0] == 0)
    return bf16_to_f32(s[o]) if s.shape[0] else np.float32(1.0)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _rows(x, xd, w, s, out, lo, hi):
    # rows lo..hi-1 of out f32 [T, O] from x f32 [T, I], w [O, I] (uint16 bf16 bits or int8 codes)
    # and s uint16 [O] bf16 row scales ([0]: none). xd: x deinterleaved for bf16dot.row_dot where it
    # applies (bf16 weights, bf16dot.fits), else [T, 0].
    T, I = x.shape
    if xd.shape[1]:  # one row at a time, one stream with the rows ahead prefetched (see bf16dot)
        n = I * w.itemsize
        ahead = bf16dot.ahead_bytes(n)
        for o in range(lo, hi):
            for t in range(T):  # the row is re-read from L1 for each row of x
                out[t, o] = row_dot(w.ctypes.data + o * n, xd.ctypes.data + 4 * I * t, I, ahead) * _scale(s, o)
        return
    # Long rows: four output rows at a time, four independent sums, so the vectorised loop is not bound
    # by one accumulator's FMA latency (on a CPU with 256-bit FMA units that capped one core at ~2
    # weights a cycle), and each x[t, i] loaded once for the four. Short rows (SHORT_ROW_BYTES): one
    # row after another, one sequential stream; four interleaved streams of 3-4 KB each read at
    # 21-25 GB/s against 31-39 for one (K2's q_b_proj and shared down_proj, 2 threads, Zen 4).
    o = lo
    while o + 4 <= hi and I * w.itemsize > SHORT_ROW_BYTES:
        for t in range(T):  # the rows are re-read from L1 for each row of x
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for i in range(I):
                xi = x[t, i]
                a0 += _weight(w, o, i) * xi
                a1 += _weight(w, o + 1, i) * xi
                a2 += _weight(w, o + 2, i) * xi
                a3 += _weight(w, o + 3, i) * xi
            out[t, o] = a0 * _scale(s, o)
            out[t, o + 1] = a1 * _scale(s, o + 1)
            out[t, o + 2] = a2 * _scale(s, o + 2)
            out[t, o + 3] = a3 * _scale(s, o + 3)
        o += 4
    for o in range(o, hi):  # short rows, or what four-row blocks left
        for t in range(T):
            acc = np.float32(0.0)
            for i in range(I):
                acc += _weight(w, o, i) * x[t, i]
            out[t, o] = acc * _scale(s, o)


@njit(nogil=True, cache=True, parallel=True, fastmath=FASTMATH)
def gemv_into(x, xd, w, s, out, nt):
    """out f32 [T, O] = x @ W.T on nt threads (bf16_gemv's and the widening int8 path's kernel, for @njit
    callers): w [O, I] bf16 bits or int8 codes, s their bf16 row scales or empty; xd f32 [T, I] scratch
    for x deinterleaved where bf16dot.fits(I) and w is bf16, else [T, 0]. Items are blocks of RB rows
    handed out by workqueue.take (each thread streams its own contiguous share; one whose core is busy
    loses items to the rest)."""
    if xd.shape[1]:
        deinterleave(x, xd)
    O = w.shape[0]
    n = (O + RB - 1) // RB
    queue = new_queue(nt)
    for th in prange(nt):
        it = take(queue, n, th, nt)
        while it < n:
            _rows(x, xd, w, s, out, it * RB, min(O, it * RB + RB))
            it = take(queue, n, th, nt)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _pair_item(x, xd, w1, s1, out1, w2, s2, out2, it, n1):
    # work item `it` of a queue over two weights: w1's blocks of RB rows (the first n1), then w2's
    if it < n1:
        _rows(x, xd, w1, s1, out1, it * RB, min(w1.shape[0], it * RB + RB))
    else:
        o = (it - n1) * RB
        _rows(x, xd, w2, s2, out2, o, min(w2.shape[0], o + RB))


@njit(nogil=True, cache=True, parallel=True, fastmath=FASTMATH)
def gemv_pair_into(x, xd, w1, s1, out1, w2, s2, out2, nt):
    """gemv_into over two weights of one kind in one queue (gemv_pair's kernel)."""
    if xd.shape[1]:
        deinterleave(x, xd)
    n1 = (w1.shape[0] + RB - 1) // RB
    n = n1 + (w2.shape[0] + RB - 1) // RB
    queue = new_queue(nt)
    for th in prange(nt):
        it = take(queue, n, th, nt)
        while it < n:
            _pair_item(x, xd, w1, s1, out1, w2, s2, out2, it, n1)
            it = take(queue, n, th, nt)


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def silu_times(g, u):
    # g f32 [T, I] <- SiLU(g) * u, the SwiGLU's middle step
    for t in range(g.shape[0]):
        for i in range(g.shape[1]):
            g[t, i] = g[t, i] / (np.float32(1.0) + np.exp(-g[t, i])) * u[t, i]


@njit(nogil=True, cache=True, parallel=True, fastmath=FASTMATH)
def swiglu_into(x, xd, wg, sg, wu, su, wd, sd, g, u, gd, out, nt):
    # out = (SiLU(x @ wg.T) * (x @ wu.T)) @ wd.T; g, u f32 [T, I] scratch, gd g's deinterleaved copy
    # (or [T, 0], as xd: see _rows). Two parallel regions, no Python between them.
    if xd.shape[1]:
        deinterleave(x, xd)
    n1 = (wg.shape[0] + RB - 1) // RB
    queue = new_queue(nt)
    for th in prange(nt):
        it = take(queue, 2 * n1, th, nt)
        while it < 2 * n1:
            _pair_item(x, xd, wg, sg, g, wu, su, u, it, n1)
            it = take(queue, 2 * n1, th, nt)
    silu_times(g, u)
    if gd.shape[1]:
        deinterleave(g, gd)
    gemv_into(g, gd, wd, sd, out, nt)


_i8x8, _i8x2 = make_rows_kernel(8), make_rows_kernel(2)  # int8 rows x a token
_i8x1 = make_rows_kernel(1, STREAM_AHEAD)


@njit(nogil=True, cache=True)
def _rows_i8(xq, xs, xc, w, s, out, lo, hi, res):
    # rows lo..hi-1 of out f32 [T, O] from the activation codes xq, xs, xc (int8dot.quantize_activations)
    # and int8 codes w [O, I] with bf16 row scales s; res f32 [8] scratch.
    # One token: a row at a time, one stream (int8dot.STREAM_AHEAD). More (each block of rows re-read from
    # L2 for each): long rows eight at a time, short ones (SHORT_ROW_BYTES) two.
    T, I = xq.shape[0], w.shape[1]
    nb = I // BLOCK
    for t in range(T):
        xa, sa, ca = xq.ctypes.data + 2 * I * t, xs.ctypes.data + 4 * nb * t, xc.ctypes.data + 4 * xc.shape[1] * t
        o = lo
        while o + 8 <= hi and I > SHORT_ROW_BYTES and T > 1:
            _i8x8(w.ctypes.data + I * o, I, xa, sa, ca, nb, res.ctypes.data)
            for r in range(8):
                out[t, o + r] = res[r] * bf16_to_f32(s[o + r])
            o += 8
        while o + 2 <= hi and T > 1:
            _i8x2(w.ctypes.data + I * o, I, xa, sa, ca, nb, res.ctypes.data)
            out[t, o] = res[0] * bf16_to_f32(s[o])
            out[t, o + 1] = res[1] * bf16_to_f32(s[o + 1])
            o += 2
        for o in range(o, hi):
            _i8x1(w.ctypes.data + I * o, I, xa, sa, ca, nb, res.ctypes.data)
            out[t, o] = res[0] * bf16_to_f32(s[o])


@njit(nogil=True, cache=True, parallel=True)
def gemv_i8_into(xq, xs, xc, w1, s1, out1, w2, s2, out2, nt):
    """int8 rows of w1 then of w2 (w2 may be w1 with out2 [T, 0]: one weight) against x quantised by
    int8dot.quantize_activations (xq, xs, xc), on nt threads: int8_gemv's and gemv_pair's kernel."""
    n1 = (w1.shape[0] + RB - 1) // RB
    n = n1 + ((w2.shape[0] + RB - 1) // RB if out2.shape[1] else 0)
    queue = new_queue(nt)
    for th in prange(nt):
        res = np.empty(8, np.float32)
        it = take(queue, n, th, nt)
        while it < n:
            if it < n1:
                _rows_i8(xq, xs, xc, w1, s1, out1, it * RB, min(w1.shape[0], it * RB + RB), res)
            else:
                o = (it - n1) * RB
                _rows_i8(xq, xs, xc, w2, s2, out2, o, min(w2.shape[0], o + RB), res)
            it = take(queue, n, th, nt)


@njit(nogil=True, cache=True)
def swiglu_i8_into(xq, xs, xc, wg, sg, wu, su, wd, sd, g, u, out, nt):
    # swiglu_into over int8 weights (I a multiple of BLOCK): gate and up, SiLU(g) * u quantised, down
    gemv_i8_into(xq, xs, xc, wg, sg, g, wu, su, u, nt)
    silu_times(g, u)
    hq, hs, hc = quantize_activations(g)
    gemv_i8_into(hq, hs, hc, wd, sd, out, wd, sd, out[:, :0], nt)


def _int8_fast(x: np.ndarray, *ws: np.ndarray) -> bool:
    """The vpmaddwd path (int8dot) applies: int8 weights whose input width is a multiple of BLOCK,
    on an x86-64 CPU with AVX2, where a second parallel region may run (concurrent_parallel_ok)."""
    return all(w.dtype == np.int8 for w in ws) and x.shape[1] % BLOCK == 0 and host_has_avx2() \
        and concurrent_parallel_ok()


def _deinterleaved(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The buffer the kernels fill with x (fp32 [T, I]) as bf16dot.row_dot reads it, where w's rows go
    through it (bf16 bits, bf16dot.fits); else an empty [T, 0], which sends _rows the other way."""
    return np.empty(x.shape if w.dtype == np.uint16 and bf16dot.fits(x.shape[1]) else (x.shape[0], 0), np.float32)


def _quantized(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return quantize_activations(np.ascontiguousarray(x))


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _gemv_serial(x, xd, w, s, out):
    if xd.shape[1]:
        deinterleave(x, xd)
    _rows(x, xd, w, s, out, 0, w.shape[0])


@njit(cache=True, parallel=True)
def _probe(a):
    for i in prange(a.shape[0]):
        a[i] = i


@functools.lru_cache(maxsize=1)
def concurrent_parallel_ok() -> bool:
    """Whether two Python threads may run Numba parallel regions at once, as this GEMV on the forward
    pass's thread does beside the expert kernels on a worker: the omp and tbb threading layers allow
    it; workqueue (Numba's fallback where neither library is installed) aborts the process. Asked
    once: a tiny parallel function makes Numba pick its layer."""
    _probe(np.zeros(4, np.int64))
    return threading_layer() != "workqueue"


def bf16_gemv(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x fp32 [T, I] (T <= MAX_ROWS), w bf16 bits as uint16 [O, I] -> x @ widen(w).T fp32 [T, O]."""
    if w.dtype != np.uint16:
        raise ValueError(f"bf16_gemv: w must be uint16 (bf16 bits), got {w.dtype}")
    return _run("bf16_gemv", x, w, np.empty(0, np.uint16), out)


def int8_gemv(x: np.ndarray, q: np.ndarray, scale: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x fp32 [T, I] (T <= MAX_ROWS), q int8 [O, I], scale bf16 bits as uint16 [O] (one per row, as
    kernels_gpu.int8.quantize_int8 makes them) -> x @ (q * scale[:, None]).T fp32 [T, O]: one byte
    read per weight, summed in fp32 and scaled once per row."""
    if q.dtype != np.int8 or scale.dtype != np.uint16 or scale.shape != (q.shape[0],):
        raise ValueError(f"int8_gemv: q must be int8 [O, I] and scale uint16 (bf16 bits) [O], got q {q.dtype} "
                         f"{q.shape} and scale {scale.dtype} {scale.shape}")
    return _run("int8_gemv", x, q, scale, out)


def gemv_pair(x: np.ndarray, w1: np.ndarray, s1: np.ndarray, w2: np.ndarray, s2: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """(x @ W1.T, x @ W2.T) in one parallel region: x fp32 [T <= MAX_ROWS, I]; w1, w2 [O1, I], [O2, I] of
    one kind, bf16 bits (uint16, s1 and s2 empty) or int8 codes with bf16 row scales s1 [O1], s2 [O2].
    Each result equals bf16_gemv's or int8_gemv's of its weight. Only where concurrent_parallel_ok()."""
    _check_fused("gemv_pair", x, ((w1, s1), (w2, s2)))
    out1 = np.empty((x.shape[0], w1.shape[0]), np.float32)
    out2 = np.empty((x.shape[0], w2.shape[0]), np.float32)
    if _int8_fast(x, w1, w2):
        gemv_i8_into(*_quantized(x), w1, s1, out1, w2, s2, out2, get_num_threads())
    else:
        x = np.ascontiguousarray(x)
        gemv_pair_into(x, _deinterleaved(x, w1), w1, s1, out1, w2, s2, out2, get_num_threads())
    return out1, out2


def swiglu_gemv(x: np.ndarray, wg: np.ndarray, sg: np.ndarray, wu: np.ndarray, su: np.ndarray, wd: np.ndarray,
                sd: np.ndarray) -> np.ndarray:
    """A SwiGLU MLP, (SiLU(x @ Wg.T) * (x @ Wu.T)) @ Wd.T, in one call: x fp32 [T <= MAX_ROWS, D]; wg, wu
    [I, D] and wd [D, I] of one kind (bf16 bits, scales empty; or int8 codes with bf16 row scales), in
    fp32 like three bf16_gemv / int8_gemv calls. Only where concurrent_parallel_ok()."""
    _check_fused("swiglu_gemv", x, ((wg, sg), (wu, su)))
    if wg.shape != wu.shape or wd.ndim != 2 or wd.shape[1] != wg.shape[0] or wd.dtype != wg.dtype \
            or sd.shape != ((wd.shape[0],) if sd.shape[0] else (0,)) or not wd.flags.c_contiguous:
        raise ValueError(f"swiglu_gemv: gate {wg.shape}, up {wu.shape} and down {wd.dtype} {wd.shape} (scales "
                         f"{sd.shape}) do not form one MLP")
    T, I = x.shape[0], wg.shape[0]
    g, u = np.empty((T, I), np.float32), np.empty((T, I), np.float32)
    out = np.empty((T, wd.shape[0]), np.float32)
    if _int8_fast(x, wg, wu) and I % BLOCK == 0:
        swiglu_i8_into(*_quantized(x), wg, sg, wu, su, wd, sd, g, u, out, get_num_threads())
    else:
        x = np.ascontiguousarray(x)
        swiglu_into(x, _deinterleaved(x, wg), wg, sg, wu, su, wd, sd, g, u, _deinterleaved(g, wd), out, get_num_threads())
    return out


def _check_fused(name: str, x: np.ndarray, pairs: tuple) -> None:
    """The fused kernels' checks: x fp32 [T <= MAX_ROWS, I]; weights [O, I] contiguous, all bf16 bits
    with no scales or all int8 with a bf16 scale a row."""
    if x.ndim != 2 or x.dtype != np.float32 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"{name}: x must be float32 [T <= {MAX_ROWS}, I], got {x.dtype} {x.shape}")
    kind = pairs[0][0].dtype
    for w, s in pairs:
        ok = w.dtype == kind and ((kind == np.uint16 and s.shape == (0,)) or
                                  (kind == np.int8 and s.dtype == np.uint16 and s.shape == (w.shape[0],)))
        if not ok or w.ndim != 2 or w.shape[1] != x.shape[1] or not w.flags.c_contiguous:
            raise ValueError(f"{name}: weights must be contiguous [O, {x.shape[1]}], all bf16 bits (uint16, no "
                             f"scales) or all int8 with a uint16 scale a row; got {w.dtype} {w.shape} with scales "
                             f"{s.dtype} {s.shape}")


def _run(name: str, x: np.ndarray, w: np.ndarray, s: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """The checks both GEMVs share, then the parallel kernel, or the serial one where two parallel
    regions at once would abort the process (concurrent_parallel_ok)."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"{name}: x {x.shape}, w {w.shape}: want x [T <= {MAX_ROWS}, I], w [O, I]")
    if x.dtype != np.float32:
        raise ValueError(f"{name}: x must be float32, got {x.dtype}")
    shape = (x.shape[0], w.shape[0])
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"{name}: out must be a C-contiguous float32 array of shape {shape}, got {out.dtype} "
                         f"{out.shape}")  # the kernel writes without bounds checks
    x, w, s = np.ascontiguousarray(x), np.ascontiguousarray(w), np.ascontiguousarray(s)
    if _int8_fast(x, w):
        gemv_i8_into(*_quantized(x), w, s, out, w, s, out[:, :0], get_num_threads())
    elif concurrent_parallel_ok():
        gemv_into(x, _deinterleaved(x, w), w, s, out, get_num_threads())  # nt: get_num_threads() inside defeats cache
    else:
        _gemv_serial(x, _deinterleaved(x, w), w, s, out)  # one core, but never a second parallel region beside the experts'
    return out
