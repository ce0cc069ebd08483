"""The DRAM read-bandwidth kernels: threaded reads of a buffer far larger than the caches, in several load
shapes, and the best-of timing over them that every bandwidth figure of the project is measured against.

Owns read_sum (Numba's own vectorised loop; also what callers read to flush the caches before a timed
call), read_lines (the same buffer read in one of SHAPES: hand-written LLVM vector loads, their width,
loads a step and streams a thread fixed whatever the compile target, where it has 256-bit vectors) and
read_gbps, the best read rate over all of them, which `bench`, `bench --kernels`, `plan`, `doctor` and
the cluster's figures report as the machine's RAM read bandwidth. Pure functions on arrays, except
read_gbps_by_shape and read_gbps, which time them (here, so that the head, the expert nodes and the
benches time them alike); imports nothing from hybrid/.

Why several shapes: a streaming loop's rate depends on its shape, by up to a fifth, and the compiler
picks read_sum's. On a 2-core Xeon VM (AVX-512), one sitting, best of 5 over 1 GB, two rounds: read_sum
34.7 / 34.8 GB/s compiled for the host and 30.1 / 29.7 for an AVX2 target (NUMBA_CPU_NAME=haswell);
ymm loads, 2 streams a thread: 36.8 / 36.9 and 37.0 / 36.8; 4 streams 33.5 / 33.5 and 33.4 / 33.1;
xmm, 2 streams 35.5 / 35.4 and 35.3 / 35.2; ymm, one stream of 16 loads a step 32.8-33.0. With read_sum
alone, `bench` on the AVX2 code path put decode at 102-104% of "the RAM bandwidth".
Whole-line loads read less than half-line ones: same sitting, 2 threads, 1 GB, zmm loads, 2 streams
32.8-33.9 GB/s and one stream 31.8-33.5 against ymm, 2 streams 39.0-42.6 (integer or float adds alike;
a dependent chain timed right after either loop ran at the same clock). The kernels' vectors are zmm.
What of the best shape a kernel can borrow, one sitting (k2-slice's o_proj in place, 4 layers, one call a matrix
after a 512 MB read, 5 shuffled rounds): its loop read 35.3 GB/s over 1 MB pieces, 33.6-34.4 as one stream,
32.8 with its sums through a float add a step, 29.6 with zmm loads, 31.8 and 29.3 called on 64 KB and 4 KB
spans (its streams restarting each call); another sitting, an L2 prefetch of every line in the loop -13 to
-17%. The kernels need that prefetch and read ~30-31 there with it, with ymm or zmm loads, one stream or two
(int8tiles.py, by ITEM_BLOCKS). Other loads and hints, a later sitting, the same matrices and flush, 5 rounds:
the best shape 30.2 and 36.7 GB/s (two sittings), the kernels' order as a plain read (zmm, one stream, an L2
prefetch 6 KB on) 28.1 / 29.4, that order with prefetchnta 12.0 (2 KB on: 18.4), with prefetcht0 26.9; AMX tile
loads (tileloadd of 1 KB tiles, one or two streams a thread, prefetched or not, with or without a tdpbssd a
tile) 27.7-28.8 against 36.7: no load or hint here reads like the best shape under a kernel's loop.
"""
from __future__ import annotations

import time

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# (name, int32 lanes a load, loads a step per stream, streams a thread): each thread's block is split
# into `streams` equal parts read side by side
SHAPES = (("ymm, 2 streams", 8, 8, 2), ("ymm, 4 streams", 8, 4, 4), ("xmm, 2 streams", 4, 16, 2))
_I32, _I64 = ir.IntType(32), ir.IntType(64)


@njit(nogil=True, cache=True, parallel=True)
def read_sum(buf, nblocks):
    """buf uint64 [n] -> the sum of buf[:nblocks * (n // nblocks)] (mod 2**64), every byte of it read once."""
    # each block summed with unit stride (vectorised), blocks spread over threads
    n = buf.shape[0] // nblocks
    part = np.zeros(nblocks, np.uint64)
    for b in prange(nblocks):
        s = buf[b * n:(b + 1) * n]
        acc = np.uint64(0)
        for i in range(s.shape[0]):
            acc += s[i]
        part[b] = acc
    return part.sum()


def _emit_streams(b: ir.IRBuilder, at, nbytes, lanes: int, unroll: int, streams: int, out) -> ir.Value:
    """The bytes at address `at` (nbytes of them) read as `streams` equal parts side by side (each a whole
    number of 64 bytes long, from `at` on: lines where `at` starts one), `unroll` loads of `lanes` int32 a
    step in each; their 32-bit sum (mod 2**32) stored at address out (int32). -> the bytes read (the
    parts' tails past a whole step are not)."""
    vec = ir.VectorType(_I32, lanes)
    step = 4 * lanes * unroll
    seg = b.and_(b.udiv(nbytes, ir.Constant(_I64, streams)), ir.Constant(_I64, -64))  # 64-byte multiples
    steps = b.udiv(seg, ir.Constant(_I64, step))
    accs = [cgutils.alloca_once_value(b, ir.Constant(vec, None)) for _ in range(4)]
    for a in accs:
        b.store(ir.Constant(vec, [ir.Constant(_I32, 0)] * lanes), a)
    with cgutils.for_range(b, steps) as it:
        for s in range(streams):
            base = b.add(b.add(at, b.mul(seg, ir.Constant(_I64, s))), b.mul(it.index, ir.Constant(_I64, step)))
            for k in range(unroll):
                v = b.load(b.inttoptr(b.add(base, ir.Constant(_I64, 4 * lanes * k)), vec.as_pointer()), align=1)
                b.store(b.add(b.load(accs[k % 4]), v), accs[k % 4])
    tot = b.add(b.add(b.load(accs[0]), b.load(accs[1])), b.add(b.load(accs[2]), b.load(accs[3])))
    s = b.extract_element(tot, ir.Constant(_I32, 0))
    for i in range(1, lanes):
        s = b.add(s, b.extract_element(tot, ir.Constant(_I32, i)))
    b.store(s, b.inttoptr(out, _I32.as_pointer()))
    return b.mul(b.mul(steps, ir.Constant(_I64, step)), ir.Constant(_I64, streams))


@intrinsic
def _lines(typingctx, at, nbytes, shape, out):
    """_emit_streams in SHAPES[shape] (a run-time index; a shape past the table reads nothing) -> bytes read."""
    sig = types.int64(types.intp, types.intp, types.intp, types.intp)

    def codegen(context, b, signature, args):
        at, nbytes, shape, out = args
        got = cgutils.alloca_once_value(b, ir.Constant(_I64, 0))
        for i, (_, lanes, unroll, streams) in enumerate(SHAPES):
            with b.if_then(b.icmp_unsigned("==", shape, ir.Constant(_I64, i))):
                b.store(_emit_streams(b, at, nbytes, lanes, unroll, streams, out), got)
        return b.load(got)

    return sig, codegen


@njit(nogil=True, cache=True, parallel=True)
def read_lines(buf, nblocks, shape):
    """buf uint64 [n] (contiguous) read in the load shape SHAPES[shape], its first nblocks * (n // nblocks)
    words as nblocks blocks spread over the threads -> (the sum of the 32-bit words read, mod 2**32; bytes
    read). The loads keep the buffer's own alignment: NumPy's large buffers start 16 bytes past a line,
    and read 0-3% faster so on the 2-core Xeon VM than from a line (ymm, 2 streams: 39.2-39.7 GB/s
    against 37.5-38.4, one process)."""
    n = buf.shape[0] // nblocks
    sums = np.zeros(nblocks, np.uint32)
    got = np.zeros(nblocks, np.int64)
    for b in prange(nblocks):
        got[b] = _lines(buf.ctypes.data + 8 * b * n, 8 * n, shape, sums.ctypes.data + 4 * b)
    total = np.uint64(0)
    for b in range(nblocks):
        total += np.uint64(sums[b])
    return total & np.uint64(0xFFFFFFFF), got.sum()


def read_gbps_by_shape(buf: np.ndarray, reps: int = 5, nblocks: int = 64) -> dict[str, float]:
    """Best-of-reps read GB/s (10^9 bytes a second) over buf (contiguous uint64, well past the caches) of
    read_sum and of each of SHAPES, on Numba's threads as set now; each rep runs every shape once, so that
    all see the same load.
    A process's first call compiles the kernels (or loads them from Numba's cache) inside its first rep:
    give it reps >= 2, or make one call first (as kernel_bench does)."""
    if buf.dtype != np.uint64 or buf.ndim != 1 or not buf.flags.c_contiguous or buf.shape[0] < 128 * nblocks:
        raise ValueError(f"read_gbps: want a contiguous uint64 buffer of at least {128 * nblocks} words (a step "
                         f"of every shape in each of its {nblocks} blocks), got {buf.dtype} {buf.shape}")
    runs = {"read_sum": lambda: (read_sum(buf, nblocks), 8 * nblocks * (buf.shape[0] // nblocks))[1]}
    for i, (name, *_) in enumerate(SHAPES):
        runs[name] = lambda i=i: int(read_lines(buf, nblocks, i)[1])
    best = {name: float("inf") for name in runs}
    nbytes = dict.fromkeys(runs, 0)
    for _ in range(reps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            nbytes[name] = run()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: nbytes[name] / best[name] / 1e9 for name in runs if nbytes[name]}


def read_gbps(buf: np.ndarray, reps: int = 5, threads: int | None = None) -> float:
    """The machine's RAM read bandwidth over buf: the best of read_gbps_by_shape's figures, on `threads`
    of Numba's threads (None: as many as it runs now)."""
    before = numba.get_num_threads()
    if threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        return max(read_gbps_by_shape(buf, reps).values())
    finally:
        numba.set_num_threads(before)


PIECE = 1 << 20  # read_spans' piece: the threads take turns piece by piece (read_spans: why)


def span_pieces(addrs: np.ndarray, lens: np.ndarray, piece: int = PIECE) -> tuple[np.ndarray, np.ndarray]:
    """Byte spans (addresses, lengths; int64) cut into pieces of at most `piece` bytes (a multiple of 64)
    -> (addresses, lengths) of the pieces, in the spans' order."""
    if piece <= 0 or piece % 64:
        raise ValueError(f"span_pieces: piece must be a positive multiple of 64 bytes, got {piece}")
    n = -(-np.asarray(lens, np.int64) // piece)
    at = np.repeat(np.asarray(addrs, np.int64), n)
    first = np.repeat(np.cumsum(n) - n, n)
    off = (np.arange(int(n.sum()), dtype=np.int64) - first) * piece
    return at + off, np.minimum(np.repeat(np.asarray(lens, np.int64), n) - off, piece)


@njit(nogil=True, cache=True, parallel=True)
def read_spans(addrs, lens, shape, T):
    """The bytes at each of addrs (int64 addresses of live memory, lens bytes each: span_pieces' pieces)
    read in the load shape SHAPES[shape] on T threads (at most Numba's count) -> (the sum of the 32-bit
    words read, mod 2**32; bytes read). Thread t of T reads pieces t, t + T, t + 2T, ...: all threads move
    through the spans together, as a kernel that splits each weight's rows does, so that memory of
    different speeds along the spans (a model in place) is shared alike. With half of the list a thread,
    the thread on the slower half set the time: k2-slice's token read in place on a VM came out at or under
    the decode's own rate (its share 96-106%); taking turns, the decode read 78-84% of it."""
    n = addrs.shape[0]
    sums = np.zeros(n, np.uint32)
    got = np.zeros(n, np.int64)
    for t in prange(T):
        for i in range(t, n, T):
            got[i] = _lines(addrs[i], lens[i], shape, sums.ctypes.data + 4 * i)
    total = np.uint64(0)
    for i in range(n):
        total += np.uint64(sums[i])
    return total & np.uint64(0xFFFFFFFF), got.sum()


def read_spans_gbps(addrs: np.ndarray, lens: np.ndarray, reps: int = 3, flush: np.ndarray | None = None) -> float:
    """Best-of-reps read GB/s over the byte spans (addresses, lengths) in place, the best of SHAPES, on
    Numba's threads as set now: what RAM gives where those bytes sit, beside read_gbps's figure for a
    buffer of its own (on a VM the two can differ by a third: runtime/probe.py). One untimed read first
    (a mapped file's pages faulted in, not timed); with `flush` (uint64, past the caches) read_sum reads it
    before each timed read, so that none starts from the caches. The memory must stay mapped and readable
    for the call. Raises ValueError under 1 MB, or where no piece is long enough for a step."""
    at, ln = span_pieces(addrs, lens)
    if not len(at) or ln.sum() < 1 << 20:
        raise ValueError(f"read_spans_gbps: want at least 1 MB of spans, got {int(ln.sum()):,} bytes")
    threads = numba.get_num_threads()
    if not int(read_spans(at, ln, 0, threads)[1]):
        raise ValueError("read_spans_gbps: no span is long enough for one step of the read loops")
    best = float("inf")
    for _ in range(reps):
        for i in range(len(SHAPES)):
            if flush is not None:
                read_sum(flush, 64)
            t0 = time.perf_counter()
            got = int(read_spans(at, ln, i, threads)[1])
            best = min(best, (time.perf_counter() - t0) / got)
    return 1 / best / 1e9
