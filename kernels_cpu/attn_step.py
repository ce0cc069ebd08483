"""A CPU decode step's attention block in one call: RMSNorm, q_a and kv_a, RMSNorm, q_b, the absorbed MLA
over the paged latent cache, o_proj, the residual and the post-attention RMSNorm.

Owns attention_step and the products it runs (linear_into, pair_into: the decode GEMVs of widen.py over bf16
bits or int8 codes, or of int8tiles.py over int8 codes held as tiles, chosen by the weights' dtype and rank
when Numba compiles). The same kernels in the same order as the separate calls (step_ops.rms_norm,
widen.gemv_pair / bf16_gemv / int8_gemv, mla.mla_decode), so the results are identical bit for bit; what goes
is the Python and torch between them. A decode step streams hundreds of MB between those small steps, so each
ran with the interpreter's code and data evicted: on a 2-core Xeon, K2 shapes, ~0.56 ms a layer outside the
kernels (three RMSNorms ~55 us each, the residual add ~30 us, the MLA call's wrapper ~160 us, each GEMV's
~40-100 us), against the kernels' ~7 ms. Pure functions on arrays; imports nothing from hybrid/.
Letters as in mla.py; D hidden, Q q_lora_rank, W = L + R.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from kernels_cpu.bf16dot import PAIR
from kernels_cpu.int8dot import BLOCK, quantize_activations
from kernels_cpu.int8tiles import dims, gemv_tiles_into
from kernels_cpu.mla import decode_into
from kernels_cpu.simd import cycles
from kernels_cpu.step_ops import rms_norm_into
from kernels_cpu.widen import gemv_i8_into, gemv_into, gemv_pair_into

PARTS = 8  # cycle stamps attention_step writes: start, then after each of its 7 steps


def linear_into(x, w, s, out, nt):
    """For @njit code: out f32 [T, O] = x f32 [T, I] @ W.T as widen.bf16_gemv (w bf16 bits, s empty),
    widen.int8_gemv (w int8 codes [O, I], s their bf16 row scales) or int8tiles.int8_gemv_tiles (w those codes
    as tiles, 4-D) compute it, on nt threads."""
    raise NotImplementedError


def pair_into(x, w1, s1, out1, w2, s2, out2, nt):
    """For @njit code: linear_into for two weights of one kind in one parallel region (widen.gemv_pair)."""
    raise NotImplementedError


def deinterleave_buffer(x):
    """For @njit code: the buffer widen's bf16 GEMVs fill with x (f32 [T, I]) as bf16dot.row_dot reads it, or
    an empty [T, 0] where I is not whole steps of its columns (then the rows are read the other way)."""
    raise NotImplementedError


@overload(deinterleave_buffer)
def _deinterleave_buffer_impl(x):
    def impl(x):  # where bf16dot.row_dot reads the rows (widen._deinterleaved)
        return np.empty(x.shape if x.shape[1] % PAIR == 0 else (x.shape[0], 0), np.float32)
    return impl


@overload(linear_into)
def _linear_into_impl(x, w, s, out, nt):
    if w.ndim == 4:
        def tiles(x, w, s, out, nt):
            xq, xs, xc = quantize_activations(x)
            gemv_tiles_into(xq, xs, xc, w, s, out, w, s, out[:, :0], nt)
        return tiles
    if w.dtype == types.int8:
        def int8(x, w, s, out, nt):
            if x.shape[1] % BLOCK == 0:
                xq, xs, xc = quantize_activations(x)
                gemv_i8_into(xq, xs, xc, w, s, out, w, s, out[:, :0], nt)
            else:
                gemv_into(x, np.empty((x.shape[0], 0), np.float32), w, s, out, nt)
        return int8

    def bf16(x, w, s, out, nt):
        gemv_into(x, deinterleave_buffer(x), w, s, out, nt)
    return bf16


@overload(pair_into)
def _pair_into_impl(x, w1, s1, out1, w2, s2, out2, nt):
    if w1.ndim == 4 and w2.ndim == 4:
        def tiles(x, w1, s1, out1, w2, s2, out2, nt):
            xq, xs, xc = quantize_activations(x)
            gemv_tiles_into(xq, xs, xc, w1, s1, out1, w2, s2, out2, nt)
        return tiles
    if w1.ndim != w2.ndim:  # one weight tiled, one not: two products
        def apart(x, w1, s1, out1, w2, s2, out2, nt):
            linear_into(x, w1, s1, out1, nt)
            linear_into(x, w2, s2, out2, nt)
        return apart
    if w1.dtype == types.int8:
        def int8(x, w1, s1, out1, w2, s2, out2, nt):
            if x.shape[1] % BLOCK == 0:
                xq, xs, xc = quantize_activations(x)
                gemv_i8_into(xq, xs, xc, w1, s1, out1, w2, s2, out2, nt)
            else:
                gemv_pair_into(x, np.empty((x.shape[0], 0), np.float32), w1, s1, out1, w2, s2, out2, nt)
        return int8

    def bf16(x, w1, s1, out1, w2, s2, out2, nt):
        gemv_pair_into(x, deinterleave_buffer(x), w1, s1, out1, w2, s2, out2, nt)
    return bf16


@njit(nogil=True, cache=True)
def attention_step(h, norms, eps, proj, kvb, main, spill, table, s0, cos, sin, scale, nt, mla_nt, amx, clock):
    """Layer's attention block for T new tokens at positions s0..: h f32 [T, D] -> (h + attention, the
    post-attention RMSNorm of that), as Model.attention_block computes it on the CPU.

    norms: (input_layernorm [D], q_a_layernorm [Q], kv_a_layernorm [L], post_attention_layernorm [D]),
    f32; eps: (rms_norm_eps, the latent norms' eps), f32. proj: (q_a, its scales, kv_a, its scales, q_b,
    its scales, o_proj, its scales), each weight bf16 bits with empty scales or int8 codes with bf16 row
    scales. kvb, main, spill, table, s0, cos, sin, scale: as mla.mla_decode takes them (table: the
    sequence's first pages); nt threads for the products, mla_nt for the MLA, amx: mla_amx.usable for
    its pools (mla.decode_into). clock int64 [PARTS]: cycle
    stamps at the start and after each step (norm, q_a and kv_a, norm, q_b, MLA, o_proj, residual and
    norm), so the caller can split its wall time."""
    T = h.shape[0]
    ln_in, ln_q, ln_kv, ln_post = norms
    wa, sa, wk, sk, wb, sb, wo, so = proj
    H, L = kvb.shape[0], kvb.shape[2]
    W = main.shape[2]
    P = dims(wb)[0] // H - (W - L)
    clock[0] = cycles()
    x = np.empty_like(h)
    rms_norm_into(h, ln_in, eps[0], x)
    clock[1] = cycles()
    qa = np.empty((T, dims(wa)[0]), np.float32)
    kv = np.empty((T, dims(wk)[0]), np.float32)
    pair_into(x, wa, sa, qa, wk, sk, kv, nt)
    clock[2] = cycles()
    cq = np.empty_like(qa)
    rms_norm_into(qa, ln_q, eps[1], cq)
    clock[3] = cycles()
    q = np.empty((T, dims(wb)[0]), np.float32)
    linear_into(cq, wb, sb, q, nt)
    clock[4] = cycles()
    o = np.empty((T, H, kvb.shape[1] - P), np.float32)
    decode_into(q.reshape(T, H, P + W - L), cos, sin, kvb, main, spill, table, s0, scale, P, o, mla_nt, kv, ln_kv,
                eps[1], amx)
    clock[5] = cycles()
    y = np.empty_like(h)
    linear_into(o.reshape(T, -1), wo, so, y, nt)
    clock[6] = cycles()
    h2 = h + y
    x2 = np.empty_like(h)
    rms_norm_into(h2, ln_post, eps[0], x2)
    clock[7] = cycles()
    return h2, x2
