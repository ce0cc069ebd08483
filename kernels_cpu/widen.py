"""bf16 (or int8) weights, fp32 math: the GEMVs of the GPU side when it runs on the CPU.

Owns bf16_gemv and int8_gemv. The checkpoint's dense weights are bf16; holding them as fp32 doubles
the RAM they take and the bytes every decoded token reads, for no gain in accuracy (bf16 -> fp32 is
exact). bf16_gemv reads the bf16 bits and widens them in registers (bits << 16), multiplying by
fp32 activations and summing in fp32, so the result equals the fp32 product up to summation order:
~2 bytes read per weight instead of 4. int8_gemv does the same over int8 weight-only codes with a
bf16 scale per row (gpu_precision 'int8', asked for on purpose: 1 byte a weight, int8's rounding).
Bandwidth-bound. Pure functions on arrays; imports nothing from hybrid/.
Letters: T rows of x, O out features, I in features.
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, threading_layer, types
from numba.extending import intrinsic

from .moe import _take

RB = 16  # output rows per work item
MAX_ROWS = 8  # rows of x per call: past this the product is compute-bound, a GEMM's job
# reassociation (a vectorised sum) and fused multiply-add; NaN and inf keep their meaning
FASTMATH = {"reassoc", "contract"}


@intrinsic
def _bf16_to_f32(typingctx, bits):
    """uint16 bf16 bits -> float32 (the bits are the float's upper half)."""
    sig = types.float32(types.uint16)

    def codegen(context, b, signature, args):
        wide = b.shl(b.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return b.bitcast(wide, ir.FloatType())

    return sig, codegen


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def _rows(x, w, out, lo, hi):
    # rows lo..hi-1 of out f32 [T, O] from x f32 [T, I] and w uint16 [O, I]
    T, I = x.shape
    for o in range(lo, hi):
        for t in range(T):  # the row is re-read from L1 for each row of x
            acc = np.float32(0.0)
            for i in range(I):
                acc += _bf16_to_f32(w[o, i]) * x[t, i]
            out[t, o] = acc


@njit(nogil=True, cache=True, parallel=True, fastmath=FASTMATH)
def _gemv(x, w, out, nt):
    # items = blocks of RB rows, handed out by _take (each thread streams its own contiguous share;
    # one whose core is busy loses items to the rest)
    O = w.shape[0]
    n = (O + RB - 1) // RB
    queue = np.zeros(8 * nt, np.int64)
    for th in prange(nt):
        it = _take(queue, n, th, nt)
        while it < n:
            _rows(x, w, out, it * RB, min(O, it * RB + RB))
            it = _take(queue, n, th, nt)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _gemv_serial(x, w, out):
    _rows(x, w, out, 0, w.shape[0])


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def _rows_int8(x, q, s, out, lo, hi):
    # rows lo..hi-1 of out f32 [T, O] from x f32 [T, I], q int8 [O, I] and bf16 row scales s uint16 [O]
    T, I = x.shape
    for o in range(lo, hi):
        scale = _bf16_to_f32(s[o])
        for t in range(T):
            acc = np.float32(0.0)
            for i in range(I):
                acc += np.float32(q[o, i]) * x[t, i]
            out[t, o] = acc * scale


@njit(nogil=True, cache=True, parallel=True, fastmath=FASTMATH)
def _gemv_int8(x, q, s, out, nt):
    O = q.shape[0]
    n = (O + RB - 1) // RB
    queue = np.zeros(8 * nt, np.int64)
    for th in prange(nt):
        it = _take(queue, n, th, nt)
        while it < n:
            _rows_int8(x, q, s, out, it * RB, min(O, it * RB + RB))
            it = _take(queue, n, th, nt)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _gemv_int8_serial(x, q, s, out):
    _rows_int8(x, q, s, out, 0, q.shape[0])


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
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"bf16_gemv: x {x.shape}, w {w.shape}: want x [T <= {MAX_ROWS}, I], w [O, I]")
    if x.dtype != np.float32 or w.dtype != np.uint16:
        raise ValueError(f"bf16_gemv: x must be float32 and w uint16 (bf16 bits), got {x.dtype} and {w.dtype}")
    if out is None:
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
    x, w = np.ascontiguousarray(x), np.ascontiguousarray(w)
    if concurrent_parallel_ok():
        _gemv(x, w, out, get_num_threads())  # nt passed in: get_num_threads() inside defeats cache=True
    else:
        _gemv_serial(x, w, out)  # one core, but never a second parallel region beside the experts'
    return out


def int8_gemv(x: np.ndarray, q: np.ndarray, scale: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x fp32 [T, I] (T <= MAX_ROWS), q int8 [O, I], scale bf16 bits as uint16 [O] (one per row, as
    kernels_gpu.int8.quantize_int8 makes them) -> x @ (q * scale[:, None]).T fp32 [T, O]: one byte
    read per weight, summed in fp32 and scaled once per row."""
    if (x.ndim != 2 or q.ndim != 2 or x.shape[1] != q.shape[1] or not 1 <= x.shape[0] <= MAX_ROWS
            or scale.shape != (q.shape[0],)):
        raise ValueError(f"int8_gemv: x {x.shape}, q {q.shape}, scale {scale.shape}: want x [T <= {MAX_ROWS}, I], "
                         "q [O, I], scale [O]")
    if x.dtype != np.float32 or q.dtype != np.int8 or scale.dtype != np.uint16:
        raise ValueError(f"int8_gemv: x must be float32, q int8 and scale uint16 (bf16 bits), got {x.dtype}, "
                         f"{q.dtype} and {scale.dtype}")
    if out is None:
        out = np.empty((x.shape[0], q.shape[0]), np.float32)
    x, q, scale = np.ascontiguousarray(x), np.ascontiguousarray(q), np.ascontiguousarray(scale)
    if concurrent_parallel_ok():
        _gemv_int8(x, q, scale, out, get_num_threads())
    else:
        _gemv_int8_serial(x, q, scale, out)
    return out
