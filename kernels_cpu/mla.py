"""Absorbed-MLA decode on the CPU in one call: the attention of a few new tokens over the paged latent
cache, from q_b_proj's output to o (their rows already written to the pages).

Owns mla_decode. A decode step's attention math was a dozen torch ops and three Numba calls per
layer (rope, head products, gather, score GEMM, softmax, value GEMM), each waking
its own threads over a few hundred KB: on two cores that cost ~2.5 ms a layer against ~0.6 ms of
reading kv_b_proj. Here it is one parallel region per layer: heads are split between threads, and
each thread walks the cache a page at a time, scoring the page against each of its heads while the
page is in L2 (online softmax: running max and sum a head, the value sum rescaled when the max
grows). Its score products are not blocked like a GEMM's, so past about a thousand positions the
caller's gather and MKL GEMMs are faster (in the forward, 4 K2 layers: equal at 1,000 positions,
20-24 against 24-26 ms at 2,000): MAX_POSITIONS is where the caller switches. kv_b's rows stream with
an L2 prefetch AHEAD rows ahead: one K2 layer at 160 positions, 2-core Xeon, 1.51-1.55 -> 1.16-1.31 ms.

Pages: pools [N, PG, W] (uint16 bf16 bits or fp32), W = L latent values then R roped key values; a
table entry e >= 0 is main[e], e < 0 spill[-1 - e] (as kernels_cpu.paged). Pure functions on arrays;
imports nothing from hybrid/.
Letters: T new tokens, H heads, P nope dim, R rope dim, L latent rank, V value dim, S positions.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels_cpu.heads import AHEAD, prefetch_head_row
from kernels_cpu.widen import widened3

FASTMATH = {"reassoc", "contract"}  # a vectorised sum and FMA; NaN and inf keep their meaning
MAX_POSITIONS = 1024  # at most this many positions per call (see the module doc); the caller checks
MAX_TOKENS = 8


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def _score4(qa, qp, buf, j, n, L, scale, sc):
    # sc[0..3, r] = scale * (latent . qa[j + c] + key . qp[j + c]) for the n rows of buf: four heads a
    # pass, so each row value is loaded once for four sums
    W = buf.shape[1]
    for r in range(n):
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for l in range(L):
            b = buf[r, l]
            a0 += qa[j, l] * b
            a1 += qa[j + 1, l] * b
            a2 += qa[j + 2, l] * b
            a3 += qa[j + 3, l] * b
        for i in range(W - L):
            b = buf[r, L + i]
            a0 += qp[j, i] * b
            a1 += qp[j + 1, i] * b
            a2 += qp[j + 2, i] * b
            a3 += qp[j + 3, i] * b
        sc[0, r] = a0 * scale
        sc[1, r] = a1 * scale
        sc[2, r] = a2 * scale
        sc[3, r] = a3 * scale


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def _heads(q, cos, sin, kvb, main, spill, table, s0, scale, P, o, h0, h1, qa, qp, m, den, acc, sc, buf):
    # heads h0..h1-1 (a multiple of 4 of them) for every token: q absorbed into the latent space, the
    # pages scored and summed, the values out. qa [nh, L], qp [nh, R], m / den [nh], acc [nh, L],
    # sc [4, PG], buf [PG, W]: this thread's scratch (buf: the current page widened, in L2)
    T = q.shape[0]
    L, PG, W = kvb.shape[2], main.shape[1], main.shape[2]
    R = W - L
    V = o.shape[2]
    for t in range(T):
        S = s0 + t + 1  # token t sees positions 0..s0+t
        for h in range(h0, h1):
            j = h - h0
            for l in range(L):
                qa[j, l] = 0.0
            for p in range(P):
                prefetch_head_row(kvb, h, p + AHEAD)
                qv = q[t, h, p]
                for l in range(L):
                    qa[j, l] += qv * widened3(kvb, h, p, l)
            for i in range(R // 2):
                x0, x1 = q[t, h, P + 2 * i], q[t, h, P + 2 * i + 1]
                qp[j, 2 * i] = x0 * cos[t, i] - x1 * sin[t, i]
                qp[j, 2 * i + 1] = x0 * sin[t, i] + x1 * cos[t, i]
            m[j] = -np.inf
            den[j] = 0.0
            for l in range(L):
                acc[j, l] = 0.0
        for k in range((S + PG - 1) // PG):
            e = table[k]
            src = main if e >= 0 else spill
            page = e if e >= 0 else -1 - e
            n = min(PG, S - k * PG)
            for r in range(n):
                for w in range(W):
                    buf[r, w] = widened3(src, page, r, w)
            for j in range(0, h1 - h0, 4):
                _score4(qa, qp, buf, j, n, L, scale, sc)
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
                for r in range(n):
                    w0, w1, w2, w3 = sc[0, r], sc[1, r], sc[2, r], sc[3, r]
                    for l in range(L):
                        b = buf[r, l]
                        acc[j, l] += w0 * b
                        acc[j + 1, l] += w1 * b
                        acc[j + 2, l] += w2 * b
                        acc[j + 3, l] += w3 * b
        for h in range(h0, h1):
            j = h - h0
            inv = np.float32(1.0) / den[j]
            for v in range(V):
                prefetch_head_row(kvb, h, P + v + AHEAD)
                a = np.float32(0.0)
                for l in range(L):
                    a += acc[j, l] * widened3(kvb, h, P + v, l)
                o[t, h, v] = a * inv


@njit(nogil=True, cache=True, parallel=True, fastmath=FASTMATH)
def _decode(q, cos, sin, kvb, main, spill, table, s0, scale, P, o, nt):
    H, L, PG = q.shape[1], kvb.shape[2], main.shape[1]
    R = main.shape[2] - L
    quads = H // 4
    for th in prange(nt):
        h0, h1 = 4 * (th * quads // nt), 4 * ((th + 1) * quads // nt)
        nh = h1 - h0
        _heads(q, cos, sin, kvb, main, spill, table, s0, scale, P, o, h0, h1, np.empty((nh, L), np.float32),
               np.empty((nh, R), np.float32), np.empty(nh, np.float32), np.empty(nh, np.float32),
               np.empty((nh, L), np.float32), np.empty((4, PG), np.float32), np.empty((PG, L + R), np.float32))


def mla_decode(q: np.ndarray, cos: np.ndarray, sin: np.ndarray, kvb: np.ndarray, main: np.ndarray,
               spill: np.ndarray, table: np.ndarray, s0: int, scale: float, threads: int) -> np.ndarray:
    """One layer's absorbed-MLA decode for T new tokens at positions s0..s0+T-1 -> o fp32 [T, H, V].

    q fp32 [T, H, P + R] (q_b_proj's output, the rope part not yet rotated); cos, sin fp32 [T, R/2];
    kvb [H, P + V, L] (bf16 bits or fp32): kv_b_proj per head; main, spill: the layer's page pools
    [N, PG, L + R] of one dtype (spill may be a one-page dummy) whose rows for positions up to
    s0 + T - 1 are written (the new tokens' too: the caller writes them, as the prompt's path does,
    so both store the same bf16 values); table int32: the sequence's pages; scale: the softmax scale.
    threads: how many threads share the heads, four at a time (H a multiple of 4)."""
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
    if S > MAX_POSITIONS or table.dtype != np.int32 or table.shape[0] < pages:
        raise ValueError(f"mla_decode: {S} positions (at most {MAX_POSITIONS}) need an int32 table of >= {pages} "
                         f"entries, got {table.dtype} {table.shape}")
    t = table[:pages]
    if int(t.max()) >= main.shape[0] or int(t.min()) < -spill.shape[0]:
        raise ValueError(f"mla_decode: a page id lies outside the pools ({main.shape[0]} and {spill.shape[0]} pages)")
    o = np.empty((T, H, kvb.shape[1] - P), np.float32)
    _decode(np.ascontiguousarray(q), np.ascontiguousarray(cos), np.ascontiguousarray(sin), kvb, main, spill, t, s0,
            np.float32(scale), P, o, max(1, min(threads, H // 4)))
    return o
