"""A CPU decode step's layers in one call: each layer's attention block (attn_step.attention_step) and MLP
half (moe_step.moe_step or mlp_step), one after another, for a run of layers (the caller gives a few at a
time: Numba compiles per length of the argument tuples).

Owns decode_layers. The same calls in the same order as a Python loop over them, so the results are
identical bit for bit; what goes is the interpreter between them. A decode step streams hundreds of MB
between those calls, so each trip through Python ran with its code and data evicted: on a 2-core Xeon,
k2-slice (K2's shapes), ~0.26 ms a layer of Python around the two calls (the page table and pools,
the expert backend's table, the clock split, torch's views), ~15 ms a token for K2's 61 layers. The
caller now does that work for every layer before the first call, while it is in cache. The last call can
also run the final RMSNorm and lm_head (the same kernels as Model.head's on the CPU): after the layers'
streams the head's Python and torch took ~0.9 ms a token on k2-slice (its 9 MB int8 lm_head read in 0.3).
Pure functions on arrays; imports nothing from hybrid/.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from kernels_cpu.attn_step import attention_step, linear_into
from kernels_cpu.moe_step import mlp_step, moe_step
from kernels_cpu.simd import cycles
from kernels_cpu.step_ops import rms_norm_into

DENSE, MOE = 0, 1  # kinds of layer in decode_layers' plan


@njit(nogil=True, cache=True)
def decode_layers(h, plan, attn, dense, moe, s0, cos, sin, nt, mla_nt, amx, ent, aclock, mclock, distinct, head,
                  hclock):
    """h f32 [T, D] through every layer of a decode step -> the last layer's output.

    plan int64 [n, 2]: per layer, its kind (DENSE or MOE) and its index into dense or moe. attn: per
    layer (norms, eps, proj, kvb, main, spill, table, scale) as attention_step takes them; dense: per
    dense layer the SwiGLU's mlp tuple (mlp_step); moe: per MoE layer (router, bias, route, shared,
    experts, counts) as moe_step takes them. dense must hold one entry even without dense layers (it
    is then not read). s0, cos, sin: the tokens' positions; nt threads for the products, mla_nt for
    the MLA (amx: mla_amx.usable for its pools), ent for the routed experts. aclock int64 [n,
    attn_step.PARTS], mclock int64 [n, moe_step.PARTS]: each call's cycle stamps (a dense layer's: its
    start in columns 0-3, its end in 4); distinct int64 [n]: the distinct experts each MoE layer computed.
    head: (norm f32 [D], eps f32, lm_head as linear_into takes it (w, s), logits f32 [N, V]): where N > 0,
    logits = lm_head(RMSNorm(the output's last N rows)), stamped in hclock int64 [2] (start, end); N = 0: no
    head in this call."""
    for l in range(plan.shape[0]):
        norms, eps, proj, kvb, main, spill, table, scale = attn[l]
        h, x = attention_step(h, norms, eps, proj, kvb, main, spill, table, s0, cos, sin, scale, nt, mla_nt, amx,
                              aclock[l])
        k = plan[l, 1]
        if plan[l, 0] == MOE:
            router, bias, route, shared, experts, counts = moe[k]
            h, distinct[l] = moe_step(h, x, router, bias, route, shared, experts, counts, nt, ent, mclock[l])
        else:
            start = cycles()
            h = mlp_step(h, x, dense[k], nt)
            end = cycles()
            for c in range(4):
                mclock[l, c] = start
            mclock[l, 4] = end
    norm, eps, w, s, logits = head
    if logits.shape[0]:
        hclock[0] = cycles()
        n = logits.shape[0]
        x = np.empty((n, h.shape[1]), np.float32)
        rms_norm_into(h[h.shape[0] - n:], norm, eps, x)
        linear_into(x, w, s, logits, nt)
        hclock[1] = cycles()
    return h
