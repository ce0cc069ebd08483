"""Absorbed-MLA decode on the CPU in one call: the attention of a few new tokens over the paged latent
cache, from q_b_proj's and kv_a_proj's outputs to o (the new rows written to the pages first, or by
the caller before).

Owns mla_decode. A decode step's attention math was a dozen torch ops and three Numba calls per
layer (rope, head products, gather, score GEMM, softmax, value GEMM), each waking
its own threads over a few hundred KB: on two cores that cost ~2.5 ms a layer against ~0.6 ms of
reading kv_b_proj. Here it is one parallel region per layer: heads are split between threads, and
each thread walks the cache a page at a time, scoring the page against each of its heads while the
page is in L2 (online softmax: running max and sum a head, the value sum rescaled when the max
grows). The scores and the value sums go through register tiles (mla_tiles.py): a page's scores four
positions x TILE heads at a time against the queries transposed once a token, the value sums four
heads x TILE latent columns summed over the page's rows; before them, 4 x 4 blocks summed along the
latent (one K2 layer, 2-core Xeon, 2.7-2.9 -> 1.9-2.0 ms at 1,000 positions, 0.88 -> 0.72 at 160), and
with the tiles, the same layer from RAM after a 700 MB read, 30-40 alternating calls: 1 / 64 / 160 / 400
/ 1,000 positions 0.70-0.72 / 0.82 / 0.91-0.94 / 1.18-1.28 / 1.95-1.98 -> 0.72-0.74 / 0.81 / 0.84-0.88 /
1.02-1.07 / 1.49-1.56 ms (a thread's walk at 160 positions: scores 100 -> 46 us, value sums 67 -> 35;
the order of each sum changes: the logits of k2-slice's greedy runs, 64-700 positions, moved up to 4e-6
of their scale in bf16w and 3e-5 in int8w, with the same tokens). It takes any number of positions: the
caller's other way (gather blocks of the pages widened, MKL GEMMs, softmax, a second gather) once took
over past 2,048, where it measured level before the tiles; with them, k2-slice int8w decode after a
2,560 / 8,192-token prompt (2-core Xeon, bench): attention math 18.2 -> 10.6 / 38.6 -> 26.2 ms a token,
12.8 -> 15.4 / 10.0 -> 12.5 tok/s (the one call also keeps decode_layers' all-layers call). There the walk
is arithmetic, ~0.73 us a position a layer on two threads (~57% of their fp32 FMA peak); libm's expf in the
softmax is not what holds it (a vectorised polynomial measured level, with the fp32 tiles and with AMX's).
Where AMX's bf16 tiles are granted (mla_amx.py), a thread with whole tiles of 16 heads takes the scores and
the value sums through them, from the pages' bf16 rows (no widened copy; fp32's sums up to their order): one
K2 layer, 2-core Xeon, 160 / 2,048 / 8,192 positions 0.46-0.49 / 1.6-1.9 / 5.7-6.5 -> 0.42-0.44 / 1.2-1.3 /
3.7-3.8 ms (scores alone through them: 8,192 at 4.8-5.1). kv_b's rows stream with an L2
prefetch AHEAD rows ahead (160 positions: 1.51-1.55 -> 1.16-1.31 ms). In bf16 the value rows go through
the bf16 GEMV's row_dot (bf16dot.py) against the value sum deinterleaved once a head: one K2 layer from
RAM, 2-core Xeon, 1 / 160 / 1,000 positions 0.81 / 0.98 / 2.03 -> 0.65 / 0.86 / 1.68 ms (the sums' order
changes: ~5e-7 apart). Both halves of kv_b
go two heads a pass, row p of head h beside row p of head h + 1 (two streams 256 KB apart instead of
one; each sum in the same order, so the same bits): one K2 layer from RAM, 1 / 160 positions, 0.66-0.69
/ 0.92 -> 0.57-0.60 / 0.78 ms; four heads a pass measured slower than two (0.63 ms at 1 position).

Pages: pools [N, PG, W] (uint16 bf16 bits or fp32), W = L latent values then R roped key values; a
table entry e >= 0 is main[e], e < 0 spill[-1 - e] (as kernels_cpu.paged). Pure functions on arrays;
imports nothing from hybrid/.
Letters: T new tokens, H heads, P nope dim, R rope dim, L latent rank, V value dim, S positions.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from kernels_cpu.bf16dot import PAIR, ahead_bytes, deinterleave, f32_to_bf16, row_dot
from kernels_cpu.heads import AHEAD, prefetch_head_row
from kernels_cpu.amx_gemm import tile_config
from kernels_cpu.mla_amx import (BLOCK, BLOCKS, HEADS, KSTEP, pack_queries, pair_page, score_block, split_weights,
                                 usable, value_block)
from kernels_cpu.mla_tiles import TILE, aligned, tile_add, tile_set
from kernels_cpu.step_ops import rms_norm_into
from kernels_cpu.widen import widened3

FASTMATH = {"reassoc", "contract"}  # a vectorised sum and FMA; NaN and inf keep their meaning
MAX_TOKENS = 8
# The walk is arithmetic on pages while RAM idles (k2-slice in the engine: ~0.75 us a position a layer, 0.61
# ms a layer at 8-40 positions, 0.91 at 400-432). Its score and value tiles prefetching the value rows
# _values reads next into L2 meanwhile (a line every other tile step, up to 1 MB a thread), three
# interleaved runs a side: 0.70-0.77 -> 0.78-0.83 ms a layer at 128-160 positions, level at 400: not kept. Again
# with one line a step of each score tile's sum (the first 1 MB of a thread's value rows over a walk of 128-160
# positions, the same bits): the attention math 2.96-3.12 -> 3.01-3.24 ms a token (k2-slice int8w, three
# interleaved bench pairs): not kept either. Where a K2 layer's 0.67 ms goes at 128 positions after a 512 MB read
# (stamped inside Numba, 14 rounds; kv_b read in place 0.415 ms): setup 0.05-0.07 (cold scratch), the absorb and
# the value rows ~0.3 each (either alone, run again at once, 0.2), the walk ~0.07. The absorb as an LLVM kernel
# with its sums in registers (128 columns x 2 heads a pass, the next pair's rows prefetched 256 KB ahead; the same
# bits): no faster after the read (0.64 against 0.59, 0.474 against 0.475 ms, two runs).
# The value rows through AMX tiles instead (tileloadd from kv_b, 4 blocks of 16 rows, three bf16 parts of the value
# sums as B's columns; with and without the next 64 KB prefetched), a thread's 32 heads, three runs: 0.26-0.29
# against 0.19-0.22 ms from cache, 0.33-0.38 against 0.25-0.30 after the read: tile loads from the rows stream
# worse than row_dot (as membw.py found for tileloadd). Not kept.


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def _values(kvb, P, acc, den, o, t, h0, h1, accd):
    # o[t, h] = kv_b's value rows of head h . acc[h - h0] / den[h - h0], for heads h0..h1-1; accd [2, L] scratch
    L, V = kvb.shape[2], o.shape[2]
    if kvb.itemsize == 2 and L % PAIR == 0:  # bf16 value rows through the bf16 GEMV's row_dot
        for h in range(h0, h1, 2):  # two heads a pass: two streams of kv_b rows
            j = h - h0
            inv, inw = np.float32(1.0) / den[j], np.float32(1.0) / den[j + 1]
            deinterleave(acc[j:j + 2], accd)  # acc in the layout row_dot reads
            row, ahead = kvb.ctypes.data + (h * kvb.shape[1] + P) * L * 2, ahead_bytes(L * 2)
            nxt = row + kvb.shape[1] * L * 2  # head h + 1's
            for v in range(V):
                o[t, h, v] = row_dot(row + v * L * 2, accd.ctypes.data, L, ahead) * inv
                o[t, h + 1, v] = row_dot(nxt + v * L * 2, accd.ctypes.data + 4 * L, L, ahead) * inw
        return
    for h in range(h0, h1):
        j = h - h0
        inv = np.float32(1.0) / den[j]
        for v in range(V):
            prefetch_head_row(kvb, h, P + v + AHEAD)
            a = np.float32(0.0)
            for l in range(L):
                a += acc[j, l] * widened3(kvb, h, P + v, l)
            o[t, h, v] = a * inv


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def _score_page(src, page, n, buf, qt, st, qb, cfg):
    # st[r, c] = (page row r widened into buf) . (query c, column c of qt) for the page's n rows: four
    # positions x TILE heads a tile (the last tile's rows past n zeroed, their scores unread); with qb
    # (the queries packed for AMX, mla_amx.py) 16 positions x 16 heads a tile product, from the bf16 rows
    W, NH = buf.shape[1], qt.shape[1]
    if qb.shape[0]:  # no widened copy: the value sums read the page's bf16 rows too (_values_amx)
        rows, stride = src.ctypes.data + page * src.strides[0], src.strides[1]
        for r0 in range(0, n, BLOCK * BLOCKS):
            for g in range(qb.shape[0]):
                score_block(cfg.ctypes.data, rows + r0 * stride, stride, min(BLOCKS, (n - r0 + BLOCK - 1) // BLOCK),
                            W // KSTEP, qb[g].ctypes.data, st.ctypes.data + 4 * (NH * r0 + HEADS * g), 4 * NH)
        return
    for r in range(n):
        for w in range(W):
            buf[r, w] = widened3(src, page, r, w)
    for r in range(n, n + (-n) % 4):
        for w in range(W):
            buf[r, w] = 0.0
    for r in range(0, n, 4):
        for c in range(0, NH, TILE):
            tile_set(buf.ctypes.data + 4 * W * r, 4 * W, qt.ctypes.data + 4 * c, 4 * NH, W,
                     st.ctypes.data + 4 * (NH * r + c), 4 * NH)


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def _sum_page(st, scale, n, j, m, den, acc, sc, buf, pa):
    # heads j..j+3 over the page's n scored rows (st, buf): the online softmax (running max m and sum den,
    # acc rescaled when the max grows), then acc += the rows' latents weighted: four heads x TILE latent
    # columns a tile where L allows, else four rows a pass; with pa (AMX's value tiles) only the weights
    # into pa, as three bf16 parts
    L = acc.shape[1]
    for c in range(4):
        for r in range(n):
            sc[c, r] = st[r, j + c] * scale
    for c in range(4):
        top = m[j + c]
        for r in range(n):
            top = max(top, sc[c, r])
        if top > m[j + c]:  # rescale what was summed under the old max
            f = np.exp(m[j + c] - top)
            den[j + c] *= f
            for l in range(L):
                acc[j + c, l] *= f
            m[j + c] = top
        for r in range(n):
            sc[c, r] = np.exp(sc[c, r] - top)
            den[j + c] += sc[c, r]
    if pa.shape[1]:
        split_weights(sc, n, j, pa)
        return
    if L % TILE == 0:
        for l0 in range(0, L, TILE):
            tile_add(sc.ctypes.data, 4 * sc.shape[1], buf.ctypes.data + 4 * l0, 4 * buf.shape[1], n,
                     acc.ctypes.data + 4 * ((j * L) + l0), 4 * L)
        return
    r = 0
    while r + 4 <= n:  # four rows a pass: a quarter of the loads and stores of acc
        for l in range(L):
            b0, b1, b2, b3 = buf[r, l], buf[r + 1, l], buf[r + 2, l], buf[r + 3, l]
            for c in range(4):
                acc[j + c, l] += sc[c, r] * b0 + sc[c, r + 1] * b1 + sc[c, r + 2] * b2 + sc[c, r + 3] * b3
        r += 4
    for r in range(r, n):
        w0, w1, w2, w3 = sc[0, r], sc[1, r], sc[2, r], sc[3, r]
        for l in range(L):
            b = buf[r, l]
            acc[j, l] += w0 * b
            acc[j + 1, l] += w1 * b
            acc[j + 2, l] += w2 * b
            acc[j + 3, l] += w3 * b


@njit(nogil=True, cache=True, inline="always")
def _values_amx(rows, n, pa, vb, zero, acc, cfg):
    # acc += a page's weights (pa, split_weights') . its first n latent rows (rows: bf16 bits [PG, W]), through
    # AMX's tiles, a group of 16 heads at a time (mla_amx.value_block); zero: a row of zeros (pair_page)
    pair_page(rows, n, vb, zero)
    nh, L = pa.shape[1], acc.shape[1]
    for g in range(nh // HEADS):
        value_block(cfg.ctypes.data, pa.ctypes.data + 2 * HEADS * g * pa.shape[2], 2 * nh * pa.shape[2],
                    2 * pa.shape[2], vb.ctypes.data, vb.shape[0], L // HEADS, acc.ctypes.data + 4 * HEADS * g * L,
                    4 * L)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _heads(q, cos, sin, kvb, main, spill, table, s0, scale, P, o, h0, h1, qa, qp, m, den, acc, sc, buf, qt, st, accd,
           qb, pa, vb, cfg):
    # heads h0..h1-1 (a multiple of 4 of them) for every token: q absorbed into the latent space, the
    # pages scored and summed, the values out. qa [nh, L], qp [nh, R], m / den [nh], acc [nh, L],
    # sc [4, PG], buf [PG4, W] (PG rounded up to 4 rows), qt [W, NH] (NH: nh rounded up to TILE, the
    # columns past nh zero), st [PG4, NH], accd [2, L]: this thread's scratch (buf: the current page widened, in L2;
    # qt: the token's queries transposed for the score tiles; st: a page's scores, a row a position;
    # accd: two heads' value sums deinterleaved for row_dot); qb, pa, vb: AMX's queries, weights and page rows
    # (mla_amx.py; empty: the fp32 tiles), cfg its tile configuration
    T = q.shape[0]
    L, PG, W = kvb.shape[2], main.shape[1], main.shape[2]
    R = W - L
    zero = np.zeros(L if pa.shape[1] else 0, np.uint16)
    for t in range(T):
        S = s0 + t + 1  # token t sees positions 0..s0+t
        for h in range(h0, h1, 2):  # two heads a pass: two streams of kv_b rows
            j = h - h0
            for l in range(L):
                qa[j, l] = 0.0
                qa[j + 1, l] = 0.0
            for p in range(P):
                prefetch_head_row(kvb, h, p + AHEAD)
                prefetch_head_row(kvb, h + 1, p + AHEAD)
                qv, qw = q[t, h, p], q[t, h + 1, p]
                for l in range(L):
                    qa[j, l] += qv * widened3(kvb, h, p, l)
                    qa[j + 1, l] += qw * widened3(kvb, h + 1, p, l)
        for h in range(h0, h1):
            j = h - h0
            for i in range(R // 2):
                x0, x1 = q[t, h, P + 2 * i], q[t, h, P + 2 * i + 1]
                qp[j, 2 * i] = x0 * cos[t, i] - x1 * sin[t, i]
                qp[j, 2 * i + 1] = x0 * sin[t, i] + x1 * cos[t, i]
            m[j] = -np.inf
            den[j] = 0.0
            for l in range(L):
                acc[j, l] = 0.0
        for l in range(L):  # the queries transposed for the score tiles, written a row at a time
            for j in range(h1 - h0):
                qt[l, j] = qa[j, l]
        for i in range(R):
            for j in range(h1 - h0):
                qt[L + i, j] = qp[j, i]
        if qb.shape[0]:
            pack_queries(qt, h1 - h0, qb)
        for k in range((S + PG - 1) // PG):
            e = table[k]
            src = main if e >= 0 else spill
            page = e if e >= 0 else -1 - e
            n = min(PG, S - k * PG)
            _score_page(src, page, n, buf, qt, st, qb, cfg)
            for j in range(0, h1 - h0, 4):
                _sum_page(st, scale, n, j, m, den, acc, sc, buf, pa)
            if pa.shape[1]:
                _values_amx(src[page], n, pa, vb, zero, acc, cfg)
        _values(kvb, P, acc, den, o, t, h0, h1, accd)


def _store(pool, page, r, w, v):
    """pool[page, r, w] = fp32 value v, rounded to bf16 bits in a uint16 pool. Numba only."""
    raise NotImplementedError


@overload(_store, inline="always")
def _store_impl(pool, page, r, w, v):
    if pool.dtype == types.uint16:
        def store(pool, page, r, w, v):
            pool[page, r, w] = f32_to_bf16(v)
    else:
        def store(pool, page, r, w, v):
            pool[page, r, w] = v
    return store


@njit(nogil=True, cache=True)
def _write_rows(kv, nw, eps, cos, sin, main, spill, table, s0):
    # the T new rows at positions s0..: kv_a's output kv [T, L + R] -> latent RMSNorm'd (nw, eps), the
    # key's rope part rotated, in the pools' dtype. No fused multiply-add (no fastmath): the rotation
    # rounds as torch's separate products do, so the rows equal what the prompt's path writes.
    T, W = kv.shape
    L = nw.shape[0]
    PG = main.shape[1]
    latent = np.empty((T, L), np.float32)
    rms_norm_into(np.ascontiguousarray(kv[:, :L]), nw, eps, latent)  # step_ops.rms_norm's own loop
    row = np.empty(W, np.float32)
    for t in range(T):
        for l in range(L):
            row[l] = latent[t, l]
        for i in range((W - L) // 2):
            x0, x1 = kv[t, L + 2 * i], kv[t, L + 2 * i + 1]
            a, b = x0 * cos[t, i], x1 * sin[t, i]
            c, d = x0 * sin[t, i], x1 * cos[t, i]
            row[L + 2 * i] = a - b
            row[L + 2 * i + 1] = c + d
        pos = s0 + t
        e = table[pos // PG]
        pool = main if e >= 0 else spill
        page = e if e >= 0 else -1 - e
        for w in range(W):
            _store(pool, page, pos % PG, w, row[w])


@njit(nogil=True, cache=True, inline="always")
def _tile_queries(W, nh, NH):
    # _heads' qt [W, NH]: its columns past nh zero (the score tiles read them), the rest written a token
    qt = aligned(W, NH)
    for i in range(W):
        for j in range(nh, NH):
            qt[i, j] = 0.0
    return qt


@njit(nogil=True, cache=True, parallel=True, fastmath=FASTMATH)
def decode_into(q, cos, sin, kvb, main, spill, table, s0, scale, P, o, nt, kv, nw, eps, amx):
    """mla_decode's kernel for @njit callers, o f32 [T, H, V] written, with no checks: q contiguous,
    table the sequence's first pages, nt threads (at most H / 4); kv [T, L + R], nw [L], eps: the new
    rows to write first (_write_rows), or kv [0, *]: written already; amx: mla_amx.usable for these
    pools (a thread with whole tiles of heads then takes its scores and value sums through AMX's tiles)."""
    H, L, PG = q.shape[1], kvb.shape[2], main.shape[1]
    R = main.shape[2] - L
    if kv.shape[0]:
        _write_rows(kv, nw, eps, cos, sin, main, spill, table, s0)
    quads = H // 4
    for th in prange(nt):
        h0, h1 = 4 * (th * quads // nt), 4 * ((th + 1) * quads // nt)
        nh = h1 - h0
        NH, PG4 = nh + (-nh) % TILE, PG + (-PG) % 4
        groups = nh // HEADS if amx and nh % HEADS == 0 else 0
        PG32 = PG + (-PG) % 32 if groups else 0
        _heads(q, cos, sin, kvb, main, spill, table, s0, scale, P, o, h0, h1, np.empty((nh, L), np.float32),
               np.empty((nh, R), np.float32), np.empty(nh, np.float32), np.empty(nh, np.float32),
               aligned(nh, L), aligned(4, PG), aligned(PG4, L + R), _tile_queries(L + R, nh, NH), aligned(PG4, NH),
               np.empty((2, L), np.float32), np.empty((groups, (L + R) // KSTEP, 3, 16, 16), np.uint32),
               np.empty((3, nh if groups else 0, PG32), np.uint16),
               np.empty((PG32 // 32, L // 16, 16, 16, 2), np.uint16), tile_config())


def mla_decode(q: np.ndarray, cos: np.ndarray, sin: np.ndarray, kvb: np.ndarray, main: np.ndarray,
               spill: np.ndarray, table: np.ndarray, s0: int, scale: float, threads: int,
               kv: np.ndarray | None = None, norm: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
    """One layer's absorbed-MLA decode for T new tokens at positions s0..s0+T-1 -> o fp32 [T, H, V].

    q fp32 [T, H, P + R] (q_b_proj's output, the rope part not yet rotated); cos, sin fp32 [T, R/2];
    kvb [H, P + V, L] (bf16 bits or fp32): kv_b_proj per head; main, spill: the layer's page pools
    [N, PG, L + R] of one dtype (spill may be a one-page dummy) whose rows for positions up to
    s0 - 1 are written; table int32: the sequence's pages; scale: the softmax scale.
    threads: how many threads share the heads, four at a time (H a multiple of 4).
    The new tokens' rows: written by the caller already (kv None), or here first from kv fp32
    [T, L + R] (kv_a_proj's output) with the latent's RMSNorm weight norm fp32 [L] and eps: the same
    values the caller's steps (step_ops.rms_norm, the rotation, torch's rounding to bf16) store, in
    this one call."""
    if q.dtype != np.float32 or q.ndim != 3:
        raise ValueError(f"mla_decode: q must be fp32 [T, H, P + R], got {q.dtype} {q.shape}")
    T, H, _ = q.shape
    L, W = kvb.shape[2], main.shape[2]
    R = W - L
    P = q.shape[2] - R
    if not 1 <= T <= MAX_TOKENS or kvb.shape[0] != H or H % 4 or not 0 < P < kvb.shape[1] \
            or cos.shape != (T, R // 2) or sin.shape != cos.shape:
        raise ValueError(f"mla_decode: shapes do not fit one MLA layer: q {q.shape}, kv_b {kvb.shape}, pages "
                         f"{main.shape}, cos {cos.shape} (at most {MAX_TOKENS} tokens, heads a multiple of 4)")
    if main.dtype != spill.dtype or main.dtype not in (np.uint16, np.float32) or spill.shape[1:] != main.shape[1:] \
            or kvb.dtype not in (np.uint16, np.float32) or not kvb.flags.c_contiguous:
        raise ValueError(f"mla_decode: pools of one dtype (uint16 bf16 bits or float32) and a contiguous kv_b are "
                         f"needed, got {main.dtype}, {spill.dtype} and {kvb.dtype}")
    S, PG = s0 + T, main.shape[1]
    pages = -(-S // PG)
    if table.dtype != np.int32 or table.shape[0] < pages:
        raise ValueError(f"mla_decode: {S} positions need an int32 table of >= {pages} entries, got {table.dtype} "
                         f"{table.shape}")
    t = table[:pages]
    if int(t.max()) >= main.shape[0] or int(t.min()) < -spill.shape[0]:
        raise ValueError(f"mla_decode: a page id lies outside the pools ({main.shape[0]} and {spill.shape[0]} pages)")
    if kv is None:
        kv, norm = np.empty((0, W), np.float32), np.empty(L, np.float32)
    elif kv.dtype != np.float32 or kv.shape != (T, W) or norm is None or norm.dtype != np.float32 or norm.shape != (L,):
        raise ValueError(f"mla_decode: the new rows need kv fp32 [{T}, {W}] and norm fp32 [{L}], got kv {kv.dtype} "
                         f"{kv.shape}, norm {None if norm is None else (norm.dtype, norm.shape)}")
    o = np.empty((T, H, kvb.shape[1] - P), np.float32)
    decode_into(np.ascontiguousarray(q), np.ascontiguousarray(cos), np.ascontiguousarray(sin), kvb, main, spill, t, s0,
            np.float32(scale), P, o, max(1, min(threads, H // 4)), np.ascontiguousarray(kv), np.ascontiguousarray(norm),
            np.float32(eps), usable(main))
    return o
