"""A CPU decode step's MLP half in one call: the router's product and choice, the shared expert, the routed
experts and the residual sum of an MoE layer (moe_step), or a dense layer's SwiGLU and its residual
(mlp_step).

Owns those two and swiglu_into_out (swiglu_out for Python), the SwiGLU of widen.swiglu_gemv for @njit callers
(bf16 bits or int8 codes, row-major or as int8tiles' tiles, chosen by the weights' dtype and rank when Numba
compiles). The same kernels in the same order as the separate calls (widen.bf16_gemv for the router,
step_ops.route, widen.swiglu_gemv, moe.moe_forward, the two adds), so the results are identical bit for bit;
what goes is the Python and torch between them. A decode step streams hundreds of MB between those steps, so
each ran with the interpreter's code and data evicted: on a 2-core Xeon, K2 shapes, ~0.45 ms a MoE layer outside
the kernels (the router's wrapper ~0.1 ms, the expert backend's submit and wait ~0.2 ms, the shared expert's
wrapper and the two adds), against the kernels' ~8 ms. Pure functions on arrays; imports nothing from hybrid/.
Letters as in moe.py.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from kernels_cpu.attn_step import deinterleave_buffer, linear_into, pair_into
from kernels_cpu.int8dot import BLOCK, quantize_activations
from kernels_cpu.int8tiles import dims
from kernels_cpu.moe import moe_into
from kernels_cpu.simd import cycles
from kernels_cpu.step_ops import route_into
from kernels_cpu.widen import silu_times, swiglu_i8_into, swiglu_into

PARTS = 5  # cycle stamps moe_step writes: start, then after the router, the shared expert, the experts, the sum


def swiglu_into_out(x, mlp, out, nt):
    """For @njit code: out f32 [T, D] = SiLU(x @ Wg.T) * (x @ Wu.T) @ Wd.T as widen.swiglu_gemv computes it;
    mlp = (wg, sg, wu, su, wd, sd), all bf16 bits with empty scales or all int8 codes with bf16 row scales."""
    raise NotImplementedError


@overload(swiglu_into_out)
def _swiglu_into_out_impl(x, mlp, out, nt):
    if not isinstance(mlp, types.BaseTuple) or len(mlp) != 6:
        return None
    if mlp[0].ndim == 4 or mlp[4].ndim == 4:  # int8 codes as tiles (int8tiles), the down projection's or not
        def tiles(x, mlp, out, nt):
            wg, sg, wu, su, wd, sd = mlp
            T, I = x.shape[0], dims(wg)[0]
            g, u = np.empty((T, I), np.float32), np.empty((T, I), np.float32)
            pair_into(x, wg, sg, g, wu, su, u, nt)  # swiglu_i8_into's steps, each over its weight's layout
            silu_times(g, u)
            linear_into(g, wd, sd, out, nt)
        return tiles
    if mlp[0].dtype == types.int8:
        def int8(x, mlp, out, nt):
            wg, sg, wu, su, wd, sd = mlp
            T, I = x.shape[0], wg.shape[0]
            g, u = np.empty((T, I), np.float32), np.empty((T, I), np.float32)
            if x.shape[1] % BLOCK == 0 and I % BLOCK == 0:
                xq, xs, xc = quantize_activations(x)
                swiglu_i8_into(xq, xs, xc, wg, sg, wu, su, wd, sd, g, u, out, nt)
            else:
                none = np.empty((T, 0), np.float32)
                swiglu_into(x, none, wg, sg, wu, su, wd, sd, g, u, none, out, nt)
        return int8

    def bf16(x, mlp, out, nt):
        wg, sg, wu, su, wd, sd = mlp
        T, I = x.shape[0], wg.shape[0]
        g, u = np.empty((T, I), np.float32), np.empty((T, I), np.float32)
        swiglu_into(x, deinterleave_buffer(x), wg, sg, wu, su, wd, sd, g, u, deinterleave_buffer(g), out, nt)
    return bf16


@njit(nogil=True, cache=True)
def swiglu_out(x, mlp, nt):
    """swiglu_into_out for Python callers: x f32 [T, D] -> f32 [T, D] (linear.swiglu over int8 tiles)."""
    out = np.empty((x.shape[0], dims(mlp[4])[0]), np.float32)
    swiglu_into_out(x, mlp, out, nt)
    return out


@njit(nogil=True, cache=True)
def moe_step(h, x, router, bias, route, shared, experts, counts, nt, ent, clock):
    """MoE layer's output added to the residual for T tokens: h, x f32 [T, D] (the residual stream and the
    post-attention RMSNorm of it) -> (h + (shared expert(x) + routed experts(x)), the number of distinct
    experts computed), as Model.moe and the CPU expert backend compute it.

    router: its weight as bf16 bits [E, D]; bias f32 [E]; route = (K, normalise, scaling factor) as
    step_ops.route takes them. shared: the shared expert as swiglu_into_out's mlp tuple. experts = (base,
    loc, D, I, amx_min, tile config, panel_min, split_pairs) as moe.moe_forward passes them to moe_into.
    counts int64 [E]: the layer's routing counts, one added for each (token, expert) pair of non-zero
    weight. nt threads for the products, ent for the experts. clock int64 [PARTS]: cycle stamps at the
    start and after each step (router, shared expert, experts, sum), so the caller can split its wall
    time."""
    T, D = x.shape
    K, norm, factor = route
    clock[0] = cycles()
    logits = np.empty((T, router.shape[0]), np.float32)
    linear_into(x, router, np.empty(0, np.uint16), logits, nt)
    ids = np.empty((T, K), np.int64)
    weights = np.empty((T, K), np.float32)
    route_into(logits, bias, K, norm, factor, ids, weights)
    seen = np.zeros(counts.shape[0], np.bool_)
    distinct = 0
    for t in range(T):
        for k in range(K):
            if weights[t, k] != 0:
                e = ids[t, k]
                counts[e] += 1
                distinct += not seen[e]
                seen[e] = True
    clock[1] = cycles()
    y = np.empty((T, D), np.float32)
    swiglu_into_out(x, shared, y, nt)
    clock[2] = cycles()
    base, loc, De, I, amx_min, cfg, panel_min, split_pairs = experts
    routed = np.empty((T, D), np.float32)
    moe_into(x, ids, weights, base, loc, De, I, routed, ent, amx_min, cfg, panel_min, split_pairs)
    clock[3] = cycles()
    h2 = h + (y + routed)
    clock[4] = cycles()
    return h2, distinct


@njit(nogil=True, cache=True)
def mlp_step(h, x, mlp, nt):
    """A dense layer's MLP added to the residual: h, x f32 [T, D] -> h + SwiGLU(x) (mlp: swiglu_into_out's)."""
    y = np.empty_like(h)
    swiglu_into_out(x, mlp, y, nt)
    return h + y
