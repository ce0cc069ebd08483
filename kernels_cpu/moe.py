"""Fused routed-expert MoE on the CPU: INT4 experts read in place, int16 activations, Numba threads.

Owns moe_forward (routing -> gate/up -> SiLU * up -> down -> weighted sum) and its threading.
Imports nothing from hybrid/. The innermost dot product is simd.py; activation quantisation actq.py;
the split of work items between threads workqueue.py.

Letters: T tokens, K experts per token, E experts, D hidden, I expert intermediate, P (token, expert)
pairs with a non-zero weight, S distinct experts among them ("slots").

Accuracy: activations (x, and the intermediate SiLU(gate) * up) are quantised to int16 per group of
32 before the integer dot products (int8 measured 1.2e-2 relative error end to end: too coarse), so
results match the fp32 reference (dequantised weights, fp32 activations) to ~5e-5 relative; the
tests hold them to 1e-4.

Decode vs prefill: one code path. Pairs are grouped by expert; each call of the row kernel takes 2-8
weight rows and a block of that expert's tokens (8, 4, 2 or 1), unpacking each weight chunk once
into registers and reusing it for every token of the block. With one token per expert that is a
bandwidth-bound GEMV, and each call takes a row of gate and the same row of up (two long streams, one
a matrix: a layer's decode 6-8% faster than with two rows of one matrix), and of down two rows half a
work item apart (two streams again); with many it is an integer
GEMM that measured 1.6x torch's fp32 matmul (AVX-512 kernels) and 1.1x (AVX2 kernels) on the
development machine, so there is no separate "dequantise a tile to fp32, then sgemm" path (its matmul
part alone would be bounded by the fp32 figure). No repacked layout either: the kernels read the
checkpoint's bytes where the table points. Copies on 2 MB pages in another layout read slower in decode (one
token, 8 of 48 experts a layer, flushed, 36 calls a variant in one sitting, the same bits; in place 35.6 GB/s,
probe 36.4): as stored 26.8 GB/s, gate row i beside up row i (scales likewise) 25.4, each row [packed | scales]
-8 to -10%; the down projection as four streams instead of two 27.2 (level).
On ymm vectors without VNNI (AVX2: Zen 3, Haswell to Skylake desktop) an expert with
PANEL_MIN_TOKENS or more in a call goes through panel.py instead: its rows unpacked once per call
into a panel in L1 that all its tokens read, int32 sums over whole groups (one K2 MoE layer at 64
tokens per expert, AVX2 code on a 2-core Xeon: 69-77% -> 101-102% of torch's fp32 matmul).
Where the CPU has VNNI (Ice Lake / Sapphire Rapids and later, Zen 4 and later, AVX-VNNI on Alder Lake)
the row kernel multiplies through vpdpbusd instead of vpmaddwd (simd.py): the same sums, fewer
instructions per weight, which prompts feel (64 tokens per expert, 2-core Xeon: 59-63% -> 68-71% of
torch's fp32 matmul with AVX-512; 77-80% -> 92% with ymm vectors).
Where the CPU has AMX (Intel Sapphire Rapids and later), an expert with AMX_MIN_TOKENS or more tokens
in the call goes through the tile kernel instead (amx.py): the same exact int32 group sums, 16 rows x
16 tokens per tile product. One K2 MoE layer at 64 tokens per expert, 2-core Xeon: 202-206 -> 380-393
GFLOP/s, 1.5x torch's fp32 matmul.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from kernels_cpu import amx, panel
from kernels_cpu.actq import VNNI, quantize_row, quantize_row_panel
from kernels_cpu.simd import host_has_avx2, make_rowblock_kernel, vector_lanes
from kernels_cpu.table import PARTS, ExpertTable
from kernels_cpu.workqueue import new_queue, take

__all__ = ["ExpertTable", "moe_forward", "PARTS"]

RB = 64  # rows per work item (a multiple of 8; D and I are multiples of 128)

# R rows x TB tokens per call; an expert's tokens go in blocks of 8, then 4, 2, 1.
_L = vector_lanes()
_R1 = 2  # rows per call for the last token of an odd block (a slot of one token goes through _k1p)
_k1 = make_rowblock_kernel(_R1, 1, _L, VNNI)
_k42 = make_rowblock_kernel(4, 2, _L, VNNI)
_k44 = make_rowblock_kernel(4, 4, _L, VNNI)
_k28 = make_rowblock_kernel(2, 8, _L, VNNI)
# One token: row i of gate beside row i of up, so each call continues two long streams (one a matrix)
# instead of two rows of one matrix 3.5 KB apart. K2's gate and up of 64 experts streamed alone, one
# token, 2-core Xeon: 70% -> 77-80% of the read probe on 2 threads, 69-75% -> 80-86% on 1; a whole
# layer (moe_forward, 48 or 192 experts, 200 calls alternating with the old code): +6.3-7.6%.
# The down projection of one token likewise reads rows o and o + RB / 2 of its item side by side: one
# stream of consecutive rows kept too few lines in flight (an arithmetic-free read in that order, C,
# over k2-slice's maps: down 28.8 -> 31.1-31.4 GB/s as two streams). moe_forward over k2-slice's
# experts, one token, 8 of 144 a call, L3 flushed between calls, five runs alternating with the old
# code: +0.8 to +2.2% (median 25.6 -> 26.0 GB/s, probe 34-36), the same output bits.
_k1p = make_rowblock_kernel(2, 1, _L, VNNI, paired=True)
_CH = 4 * _L  # columns per chunk
# Experts with at least this many tokens in a call go through AMX's tile kernel where the CPU has it
# (amx.py); the others, and every decode step, through the row kernel. A tile product costs the same for
# 1 to 16 tokens: one K2 MoE layer, 2-core Xeon, GFLOP/s with the threshold at 4 / 8 / never: 384
# experts, 128 tokens (the real model's pp128: 2.7 per expert) 116-121 / 145-153 / 156-157; 384 experts,
# 512 tokens 211-213 / 224-232 / 193-199; 48 experts, 128 tokens (k2-slice) 323-329 / 308-313 / 199-208.
AMX_MIN_TOKENS = 8
_TILE_CFG = amx.tile_config()
# Elsewhere, on ymm vectors without VNNI (AVX2), experts with this many tokens or more in a call go
# through the panel kernel (panel.py); None: never (tests set it to force the path on any AVX2 CPU).
PANEL_MIN_TOKENS = panel.PANEL_MIN if panel.available() else None
# Calls with at most this many (token, expert) pairs (decode: K of them) run the down projection an
# expert at a time, each thread streaming its share of the experts' down matrices in memory order, and
# keep each pair's output row apart until the end (P x D floats) instead of taking blocks of output
# rows across every expert (one 64-row stretch of each expert's matrix in turn). One K2 MoE layer, one
# token, 48 or 192 experts, 2-core Xeon: +3.0-3.7% on the layer, the same output bits.
SPLIT_PAIRS = 64
# Where the rest of RAM's rate goes in decode: k2-slice's mapped experts, one token, 8 of 48 a layer, each call
# after a 512 MB read, 27 calls a variant in one process, two sittings (medians). A read of the same bytes in this
# order with no arithmetic (gate and up rows paired, then down rows RB / 2 apart, each row's scales beside it, the
# same prefetches) read 81-88% of membw's best read shape over those experts (22.4-24.4 against 27.6 GB/s), whether
# its loads were zmm or ymm, prefetched or not, its rows paired or in memory order; moe_into read 88-92% of that
# plain read (21.3-21.5 GB/s). The order, not the arithmetic, holds most of the gap (int8tiles.py found the same for
# the int8 GEMV). (The best shape's figure, a best of a few reads, lies ~2% over their median: int8tiles.py.)


@njit(nogil=True, cache=True)
def _dot8(w, wst, s, sst, nch, xa, dg, xs, toks, ntok, din, res):
    """8 weight rows x ntok tokens -> res f32 [ntok, 8] (addresses; toks: int64 row indices)."""
    t = 0
    while ntok - t >= 8:
        for r in range(0, 8, 2):
            _k28(w + r * wst, wst, s + r * sst, sst, nch, xa, dg, xs, toks + 8 * t, din, res + 32 * t + 4 * r, 8)
        t += 8
    if ntok - t >= 4:
        for r in range(0, 8, 4):
            _k44(w + r * wst, wst, s + r * sst, sst, nch, xa, dg, xs, toks + 8 * t, din, res + 32 * t + 4 * r, 8)
        t += 4
    if ntok - t >= 2:
        for r in range(0, 8, 4):
            _k42(w + r * wst, wst, s + r * sst, sst, nch, xa, dg, xs, toks + 8 * t, din, res + 32 * t + 4 * r, 8)
        t += 2
    if ntok - t >= 1:
        for r in range(0, 8, _R1):
            _k1(w + r * wst, wst, s + r * sst, sst, nch, xa, dg, xs, toks + 8 * t, din, res + 32 * t + 4 * r, 8)


@njit(nogil=True, cache=True, inline="always")
def _rows_at(base, loc, e, m, o0, din):
    """Addresses of row o0 of expert e's matrix m (0 gate, 1 up, 2 down; din columns): its packed
    bytes, its bf16 scales."""
    return (base[loc[e, 2 * m, 0]] + loc[e, 2 * m, 1] + o0 * (din // 2),
            base[loc[e, 2 * m + 1, 0]] + loc[e, 2 * m + 1, 1] + o0 * (din // 16))


@njit(nogil=True, cache=True)
def _gate_up_rows(base, loc, e, o0, nrows, din, xa, dg, xs, tok, res, gu, p):
    """Rows o0..o0 + nrows - 1 of expert e's gate and up against one activation row (its index at the
    int64 address tok) -> gu[0, p, rows], gu[1, p, rows]; each gate row beside the same up row (_k1p)."""
    wg, sg = _rows_at(base, loc, e, 0, o0, din)
    wu, su = _rows_at(base, loc, e, 1, o0, din)
    for r in range(nrows):
        _k1p(wg + r * (din // 2), wu - wg, sg + r * (din // 16), su - sg, din // _CH, xa.ctypes.data, dg.ctypes.data,
             xs.ctypes.data, tok, din, res.ctypes.data, 8)
        gu[0, p, o0 + r] = res[0]
        gu[1, p, o0 + r] = res[1]


@njit(nogil=True, cache=True)
def _group_pairs(ids, wts, E):
    """Counting sort of the (t, k) pairs with w != 0 by expert.

    -> slot_e int64 [S], slot_p int64 [S + 1] (pairs of slot s are slot_p[s]:slot_p[s+1]),
       pair_tok int64 [P], pair_w f32 [P], the most pairs of a slot (at least 1).
    """
    T, K = ids.shape
    start = np.zeros(E + 1, np.int64)
    for t in range(T):
        for k in range(K):
            if wts[t, k] != 0:
                start[ids[t, k] + 1] += 1
    S = 0
    for e in range(E):
        S += start[e + 1] > 0
        start[e + 1] += start[e]
    P = start[E]
    pair_tok = np.empty(P, np.int64)
    pair_w = np.empty(P, np.float32)
    fill = start[:E].copy()
    for t in range(T):
        for k in range(K):
            if wts[t, k] != 0:
                e = ids[t, k]
                pair_tok[fill[e]] = t
                pair_w[fill[e]] = wts[t, k]
                fill[e] += 1
    slot_e = np.empty(S, np.int64)
    slot_p = np.empty(S + 1, np.int64)
    s = 0
    for e in range(E):
        if start[e + 1] > start[e]:
            slot_e[s] = e
            slot_p[s] = start[e]
            s += 1
    slot_p[S] = P
    maxn = 1
    for s in range(S):
        maxn = max(maxn, slot_p[s + 1] - slot_p[s])
    return slot_e, slot_p, pair_tok, pair_w, maxn


@njit(nogil=True, cache=True)
def _codes(N, din, panels):
    """Buffers for N rows of din activations as int16 codes: in the row kernel's layout (codes, group
    scales, offsets: actq.quantize_row) and, if panels, in the panel kernel's too (else empty)."""
    n = N if panels else 0
    return (np.empty((N, din), np.int16), np.empty((N, din // 32), np.float32), np.empty((N, din // 32), np.float32),
            np.empty((n, din), np.int16), np.empty((n, din // 32), np.float32), np.empty((n, din // 32), np.int32))


@njit(nogil=True, cache=True)
def _quantize(v, codes, t):
    # v f32 [din] -> row t of the _codes buffers
    xa, dg, xs, xp, dgp, xsp = codes
    quantize_row(v, xa[t], dg[t], xs[t])
    if xp.shape[0]:
        quantize_row_panel(v, xp[t], dgp[t], xsp[t])


@njit(nogil=True, cache=True)
def _silu_mul_quantize(g, u, codes, p):
    # g, u f32 [I] -> SiLU(g) * u written over g, then quantised into row p of the _codes buffers
    for i in range(g.shape[0]):
        g[i] = g[i] / (np.float32(1.0) + np.exp(-g[i])) * u[i]
    _quantize(g, codes, p)


@njit(nogil=True, cache=True)
def _buffers(maxn, din, tiles, panels):
    """A thread's scratch for _block: the row kernel's results, the tile kernel's unpacked rows, their
    scales and its results (empty without tile blocks in this call), an output block (the down
    projection's), and the panel kernel's scratch (empty without it)."""
    N, M = amx.N, amx.M
    return (np.empty(8 * maxn, np.float32), np.empty((M, din if tiles else 0), np.int8),
            np.empty((din // 32 if tiles else 0, M), np.float32),
            np.empty((maxn // N + 1 if tiles else 0, M, N), np.float32), np.empty((maxn, RB), np.float32),
            np.empty(panel.scratch_floats(maxn, RB) if panels else 0, np.float32))


@njit(nogil=True, cache=True, inline="always")
def _on_rows(n, b0, b1, panel_min, xp):
    """Whether _block takes the row kernel for a slot of n tokens with tile blocks b0..b1-1 (neither the
    panel kernel nor the tile kernel)."""
    return not (n >= panel_min and xp.shape[0] > 0) and b1 <= b0


@njit(nogil=True, cache=True)
def _block(w, sc, din, xa, dg, xs, toks, n, bufs, b0, b1, bt, dgb, cfg, xp, dgp, xsp, got, panel_min):
    """RB weight rows (packed bytes at w, bf16 scales at sc, din columns) x the n activation rows listed
    at toks (int64 address) -> got f32 [n, RB] (a view, written): through the panel kernel when the
    slot has panel_min tokens or more and the activations come in its layout too (xp, dgp, xsp not
    empty), the tile kernel when it has token blocks b0 < b1 (amx.slot_blocks), else the row kernel."""
    res, ta, tws, tres, _, pan = bufs
    N, M = amx.N, amx.M
    if n == 1 and _on_rows(n, b0, b1, panel_min, xp):
        # one token: rows o and o + RB / 2 side by side, two streams (see _k1p), the same sums
        h = RB // 2
        for o in range(h):
            _k1p(w + o * (din // 2), h * (din // 2), sc + o * (din // 16), h * (din // 16), din // _CH,
                 xa.ctypes.data, dg.ctypes.data, xs.ctypes.data, toks, din, res.ctypes.data, 8)
            got[0, o] = res[0]
            got[0, o + h] = res[1]
    elif _on_rows(n, b0, b1, panel_min, xp):
        for o in range(0, RB, 8):
            _dot8(w + o * (din // 2), din // 2, sc + o * (din // 16), din // 16, din // _CH, xa.ctypes.data,
                  dg.ctypes.data, xs.ctypes.data, toks, n, din, res.ctypes.data)
            for j in range(n):
                for r in range(8):
                    got[j, o + r] = res[8 * j + r]
    elif n >= panel_min and xp.shape[0] > 0:
        panel.panel_rows(w, din // 2, sc, din // 16, RB, din, xp, dgp, xsp, toks, n, pan, got)
    else:
        for o in range(0, RB, M):
            amx.tile_rows(w + o * (din // 2), sc + o * (din // 16), din, ta, tws, tres, cfg, bt, dgb, b0, b1)
            for j in range(n):
                for r in range(M):
                    got[j, o + r] = tres[j // N, r, j % N]


@njit(nogil=True, cache=True)
def _down_rows(base, loc, slot_e, slot_p, s, o0, I, ch, pidx, bufs, blk, bt, dgb, cfg, panel_min, got):
    """Rows o0..o0 + RB - 1 of slot s's down matrix against its pairs' rows of ch (_codes) -> got f32
    [the slot's pairs, RB] (_block)."""
    ha, hg, hs, hp, hgp, hsp = ch
    dw, ds = _rows_at(base, loc, slot_e[s], 2, o0, I)
    _block(dw, ds, I, ha, hg, hs, pidx.ctypes.data + 8 * slot_p[s], slot_p[s + 1] - slot_p[s], bufs, blk[s],
           blk[s + 1], bt, dgb, cfg, hp, hgp, hsp, got, panel_min)


@njit(nogil=True, cache=True)
def _add_pairs(out, got, pair_tok, pair_w, p0, n, o0):
    """out[pair_tok[p0 + j], o0 + r] += pair_w[p0 + j] * got[j, r] for pairs j < n, r < got's width."""
    for j in range(n):                              # a loop: an array expression would allocate
        t, wj = pair_tok[p0 + j], pair_w[p0 + j]
        for r in range(got.shape[1]):
            out[t, o0 + r] += wj * got[j, r]


@njit(nogil=True, cache=True, parallel=True)
def moe_into(x, ids, wts, base, loc, D, I, out, nt, amx_min, cfg, panel_min, split_pairs):
    # x f32 [T, D], ids int64 [T, K], wts f32 [T, K], base int64 [arenas], loc int64 [E, 6, 2]
    # amx_min: slots with this many tokens or more go through the tile kernel (cfg: its tile config);
    # panel_min: the same for the panel kernel, checked first; split_pairs: SPLIT_PAIRS
    # Work items are handed out by take: each thread streams its own contiguous share in memory
    # order, and one whose core is busy elsewhere (torch, IO, other processes) loses items to the rest.
    T = x.shape[0]
    slot_e, slot_p, pair_tok, pair_w, maxn = _group_pairs(ids, wts, loc.shape[0])
    S, P = slot_e.shape[0], pair_tok.shape[0]
    queue = new_queue(nt)                           # work counters, see workqueue.take

    cx = _codes(T, D, maxn >= panel_min and panel.fits(D))   # int16 activations
    xa, dg, xs, xp, dgp, xsp = cx
    if T >= 16:
        for t in prange(T):
            _quantize(x[t], cx, t)
    else:                                           # each parallel region costs a thread wake-up
        for t in range(T):
            _quantize(x[t], cx, t)

    # gate and up: items = (slot, matrix, block of RB rows), in memory order, so a thread's
    # consecutive items continue one stream of rows; gu[m, p, i] = row i of matrix m . pair p
    nb = I // RB
    gu = np.empty((2, P, I), np.float32)
    blk, bt, dgb = amx.slot_blocks(slot_p, amx_min, xa, dg, pair_tok, D // 32)
    for th in prange(nt):
        bufs = _buffers(maxn, D, blk[S] > 0, xp.shape[0] > 0)
        it = take(queue, S * 2 * nb, th, nt)
        while it < S * 2 * nb:
            s, m, o0 = it // (2 * nb), (it // nb) % 2, (it % nb) * RB
            e, p0, n = slot_e[s], slot_p[s], slot_p[s + 1] - slot_p[s]
            if n == 1 and _on_rows(n, blk[s], blk[s + 1], panel_min, xp):
                # one token on the row kernel: the slot's items are half blocks of gate and up together
                _gate_up_rows(base, loc, e, (it % (2 * nb)) * (RB // 2), RB // 2, D, xa, dg, xs,
                              pair_tok.ctypes.data + 8 * p0, bufs[0], gu, p0)
            else:
                w, sc = _rows_at(base, loc, e, m, o0, D)
                _block(w, sc, D, xa, dg, xs, pair_tok.ctypes.data + 8 * p0, n, bufs, blk[s], blk[s + 1], bt, dgb,
                       cfg, xp, dgp, xsp, gu[m, p0:p0 + n, o0:o0 + RB], panel_min)
            it = take(queue, S * 2 * nb, th, nt)

    ch = _codes(P, I, maxn >= panel_min and panel.fits(I))   # SiLU(gate x) * (up x), quantised
    ha, hg, _, hp, _, _ = ch
    if P >= 2:  # the threads are still awake from gate/up: one token's 8 pairs 110-117 -> 80 us a K2 layer
        for p in prange(P):
            _silu_mul_quantize(gu[0, p], gu[1, p], ch, p)
    else:
        for p in range(P):
            _silu_mul_quantize(gu[0, p], gu[1, p], ch, p)

    # down: items = blocks of RB output rows, each over every slot (no write conflicts); with few pairs
    # (decode) items = (slot, block of RB rows) in memory order instead, each pair's rows kept apart
    # and summed after (in the same order)
    pidx = np.arange(P)
    queue2 = new_queue(nt)
    nb = D // RB
    split = P <= split_pairs
    ni = S * nb if split else nb
    per = np.empty((P if split else 0, D), np.float32)
    blk, bt, dgb = amx.slot_blocks(slot_p, amx_min, ha, hg, pidx, I // 32)
    for th in prange(nt):
        bufs = _buffers(maxn, I, blk[S] > 0, hp.shape[0] > 0)
        item = take(queue2, ni, th, nt)
        while item < ni:
            o0 = (item % nb) * RB
            s0, s1 = (item // nb, item // nb + 1) if split else (0, S)   # split: one slot's block
            if not split:
                out[:, o0:o0 + RB] = 0
            for s in range(s0, s1):
                p0, n = slot_p[s], slot_p[s + 1] - slot_p[s]
                got = per[p0:p0 + n, o0:o0 + RB] if split else bufs[4][:n, :]   # one call site: compile time
                _down_rows(base, loc, slot_e, slot_p, s, o0, I, ch, pidx, bufs, blk, bt, dgb, cfg, panel_min, got)
                if not split:
                    _add_pairs(out, got, pair_tok, pair_w, p0, n, o0)
            item = take(queue2, ni, th, nt)
    if split:                                       # pairs in slot order: the sums' order above
        out[:] = 0
        _add_pairs(out, per, pair_tok, pair_w, 0, P, 0)


def moe_forward(x: np.ndarray, ids: np.ndarray, weights: np.ndarray, table: ExpertTable,
                out: np.ndarray | None = None) -> np.ndarray:
    """Routed experts of one layer: out[t] = sum_k weights[t, k] * down(silu(gate x_t) * up x_t).

    x: float32 [T, D]; ids: int64 or int32 [T, K] expert ids (repeats allowed); weights: float32
    [T, K] (pairs with weight 0 are skipped). out: float32 [T, D] C-contiguous, overwritten, or None.
    Experts are read in place from table's arenas. Runs on numba's threads (numba.set_num_threads,
    which is per calling thread) and releases the GIL throughout the compute.
    """
    if not host_has_avx2():
        raise RuntimeError("kernels_cpu.moe_forward needs an x86-64 CPU with AVX2 and FMA")
    D, I = table.hidden, table.inter
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != D:
        raise ValueError(f"moe_forward: x must be [T, {D}], got {x.shape}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if ids.ndim != 2 or ids.shape[0] != x.shape[0] or weights.shape != ids.shape:
        raise ValueError(f"moe_forward: ids and weights must both be [T, K] with T={x.shape[0]}; "
                         f"got {ids.shape} and {weights.shape}")
    table.check_experts(ids)
    if out is None:
        out = np.empty((x.shape[0], D), dtype=np.float32)
    elif out.shape != (x.shape[0], D) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"moe_forward: out must be C-contiguous float32 [{x.shape[0]}, {D}]")
    if x.shape[0] == 0:
        return out
    base, _ = table.arena_addresses()
    # nt passed in: get_num_threads() inside a parallel function defeats cache=True
    moe_into(x, ids, weights, base, table.loc, D, I, out, get_num_threads(), *kernel_options(x.shape[0]))
    return out


def kernel_options(tokens: int) -> tuple[int, np.ndarray, int, int]:
    """(amx_min, tile config, panel_min, split_pairs): what moe_into takes after nt for a call of
    `tokens` tokens on this CPU (a threshold past the call's tokens where the CPU lacks that kernel)."""
    amx_min = AMX_MIN_TOKENS if amx.available() else tokens + 1
    panel_min = PANEL_MIN_TOKENS if PANEL_MIN_TOKENS is not None else tokens + 1
    return amx_min, _TILE_CFG, panel_min, SPLIT_PAIRS
