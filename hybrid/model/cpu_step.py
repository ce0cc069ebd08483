"""A CPU decode step in one Numba call for all its layers (kernels_cpu.token_step), or a layer in two, where
they apply: the attention block (kernels_cpu.attn_step) and the MLP half with its residual
(kernels_cpu.moe_step: an MoE layer's router, shared and routed experts, or a dense layer's SwiGLU).

Owns the choice (the GPU side on the CPU in fp32, a decode step's few tokens, the paged cache's one-call
MLA, the linears all bf16 or all int8 held as widen's GEMVs read them, the router's weight in bf16, an
expert backend that hands out its table: ExpertBackend.decode_table), the per-layer arguments (numpy
views of the weights, built once) and the split of each call's wall time between the bench's account's
parts. The results are Model.attention_block's and Model.moe's (plus the residual), bit for bit: the
same kernels in the same order. Per layer the one-call path still has Python to do (the page table and
pools, the expert backend's table, the clock split): in the all-layers call it runs for every layer
first, in cache, instead of between the layers' streams.
"""
from __future__ import annotations

import time
from typing import Any

import numba
import numpy as np
import torch
from numba.core.errors import TypingError

from kernels_cpu import mla_amx
from kernels_cpu.attn_step import PARTS, attention_step
from kernels_cpu.int8tiles import logical_shape
from kernels_cpu.mla import MAX_TOKENS as MLA_MAX_TOKENS
from kernels_cpu.moe import kernel_options
from kernels_cpu.moe_step import PARTS as MOE_PARTS
from kernels_cpu.moe_step import mlp_step, moe_step
from kernels_cpu.simd import host_has_avx2
from kernels_cpu.token_step import DENSE, MOE, decode_layers
from kernels_cpu.widen import MAX_ROWS

from hybrid.model.linear import bf16_bits, decode_weights, swiglu_fits

_PROJECTIONS = (1, 3, 5)  # attention_step's steps that are products: q_a with kv_a, q_b, o_proj
# Layers per decode_layers call. Numba compiles it per length of its argument tuples: all of K2's 61
# layers in one call took ~3 minutes to compile (tiny shapes, 2-core Xeon), 4 took ~6 s (each other
# mix of dense and MoE layers in a call is one more such compile, once, cached on disk).
LAYERS_PER_CALL = 4
# What a decode token spends outside the kernels (k2-slice int8w, 2-core Xeon VM, after the stream, caches cold):
# ~1 ms. Numba's dispatch of decode_layers' arguments (118 arrays in tuples) 0.15 ms (0.01 warm), this module's
# Python around the call ~0.3 (the time split into model.times 0.1, the two torch.from_numpy 0.07), the
# forward's 0.1, sampling 0.1, the token loop's ~0.25. OMP_WAIT_POLICY=ACTIVE (threads kept spinning between
# calls) measured level in the bench.


def layers(model: Any, h: torch.Tensor, cache: Any, s0: int, cos: torch.Tensor, sin: torch.Tensor,
           latent_eps: float, head_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Every layer of model (a hybrid.model.k2.Model) for a decode step in a few calls (kernels_cpu.token_step,
    LAYERS_PER_CALL layers each, their arguments all built first):
    h [T, D] -> (the last layer's output, Model.head's logits [head_rows, vocab] of its last head_rows rows
    from the last call, or None where head_rows is 0 or the final norm and lm_head are not held as the
    GEMVs read them), each part's time added to model.times (attention and its projections, dense,
    router, shared, experts_wait, lm_head) and the experts reported to the backend; None where a layer's
    one-call steps do not apply (the caller then goes layer by layer)."""
    n, T = model.cfg.num_hidden_layers, h.shape[0]
    if not _decode_rows(h) or model.cpu_steps.get("token") is False:
        return None
    attn, dense, moe, plan, threads = [], [], [], [], set()
    for i in range(n):  # the per-layer Python here runs back to back, in cache, before the layers stream
        if model.cfg.is_moe_layer(i):
            if (got := _moe_call(model, i, h)) is None:
                return None
            plan.append((MOE, len(moe)))
            moe.append(got[0])
            threads.add(got[1])
        else:
            if (d := _dense_call(model, i, h)) is None:
                return None
            plan.append((DENSE, len(dense)))
            dense.append(d)
    if not moe or len(threads) != 1:
        return None
    for i in range(n):  # after the MLPs: step_pages counts the cache bytes a call will read
        if (a := _attention_call(model, i, h, cache, s0, latent_eps)) is None:
            return None
        attn.append(a[:8])
    aclock, mclock, distinct = np.empty((n, PARTS), np.int64), np.zeros((n, MOE_PARTS), np.int64), np.zeros(n, np.int64)
    out, cos_n, sin_n = np.ascontiguousarray(h.numpy()), cos.numpy(), sin.numpy()
    nt = numba.get_num_threads()
    mla_nt, ent = max(1, min(nt, attn[0][3].shape[0] // 4)), threads.pop()
    amx = mla_amx.usable(attn[0][4])
    head, hclock = _head_args(model, h, head_rows), np.zeros(2, np.int64)
    t0 = time.perf_counter()
    try:
        for g0 in range(0, n, LAYERS_PER_CALL):
            g1 = min(n, g0 + LAYERS_PER_CALL)
            local: list[tuple[int, int]] = []
            own: dict[int, list] = {DENSE: [], MOE: []}
            for kind, k in plan[g0:g1]:
                local.append((kind, len(own[kind])))
                own[kind].append((dense if kind == DENSE else moe)[k])
            out = decode_layers(out, np.array(local, np.int64), tuple(attn[g0:g1]), tuple(own[DENSE] or [moe[0][3]]),
                                tuple(own[MOE] or [moe[0]]), s0, cos_n, sin_n, nt, mla_nt, amx, ent, aclock[g0:g1],
                                mclock[g0:g1], distinct[g0:g1], head if g1 == n else (*head[:4], head[4][:0]), hclock)
    except TypingError:  # layers held in ways that make no one tuple type: layer by layer
        model.cpu_steps["token"] = False
        return None
    hc = hclock.tolist()
    _add_layer_times(model, plan, aclock.tolist(), mclock.tolist(), distinct.tolist(), T, time.perf_counter() - t0, hc)
    return torch.from_numpy(out), (torch.from_numpy(head[4]) if head[4].shape[0] else None)


def _head_args(model: Any, h: torch.Tensor, rows: int) -> tuple:
    """decode_layers' head (final norm, eps, lm_head as linear_into reads it, logits f32 [rows, vocab]): logits
    [0, vocab] where rows is 0 or the norm and lm_head are not held so (then no head runs in the call)."""
    args = model.cpu_steps.get("head")
    if args is None:
        ws, norm = decode_weights(h, (model.weights.lm_head,)), model.weights.norm
        ok = ws is not None and norm.dtype == torch.float32 and norm.device.type == "cpu"
        args = model.cpu_steps["head"] = (norm.numpy(), np.float32(model.cfg.rms_norm_eps), *ws[0]) if ok else \
            (np.zeros(h.shape[1], np.float32), np.float32(0), np.empty((0, h.shape[1]), np.int8), np.empty(0, np.uint16))
    vocab = logical_shape(args[2])[0]
    return (*args, np.empty((rows if vocab else 0, vocab), np.float32))


def _add_layer_times(model: Any, plan: list, aclock: list, mclock: list, distinct: list, T: int, wall: float,
                     hclock: list) -> None:
    """decode_layers' stamps into model.times, layer by layer (the head's too where it ran: hclock), and its
    MoE layers' experts to the backend."""
    first, last = aclock[0][0], max(aclock[-1][-1], mclock[-1][-1], hclock[1])
    per_cycle = wall / (last - first) if last > first else 0.0
    times = model.times
    times.lm_head += (hclock[1] - hclock[0]) * per_cycle
    for i, ((kind, _), a, m) in enumerate(zip(plan, aclock, mclock)):
        times.attention += (a[-1] - a[0]) * per_cycle
        times.attention_proj += _projections(a) * per_cycle
        if kind == MOE:
            _add_moe_times(model, i, T, m, per_cycle, 0.0, distinct[i])
        else:
            times.dense += (m[4] - m[0]) * per_cycle


def attention(model: Any, i: int, h: torch.Tensor, cache: Any, s0: int, cos: torch.Tensor, sin: torch.Tensor,
              latent_eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Model.attention_block for layer i of model (a hybrid.model.k2.Model) over the absorbed MLA in one
    call: (h + attention, the post-attention RMSNorm of it), with the projections' share of the time
    added to model.times.attention_proj; None where it does not apply (the caller takes the separate
    steps)."""
    if not _decode_rows(h) or (args := _attention_call(model, i, h, cache, s0, latent_eps)) is None:
        return None
    *args, clock = args
    nt = numba.get_num_threads()
    t0 = time.perf_counter()
    h2, x2 = attention_step(np.ascontiguousarray(h.numpy()), *args[:7], s0, cos.numpy(), sin.numpy(), args[7], nt,
                            max(1, min(nt, args[3].shape[0] // 4)), mla_amx.usable(args[4]), clock)
    wall = time.perf_counter() - t0
    c = clock.tolist()  # Python numbers: each NumPy call costs tens of us with the caches cold
    if c[-1] > c[0]:
        model.times.attention_proj += wall * _projections(c) / (c[-1] - c[0])
    return torch.from_numpy(h2), torch.from_numpy(x2)


def _projections(c: list[int]) -> int:
    """Cycles of attention_step's products (q_a with kv_a, q_b, o_proj) among its stamps c."""
    return sum(c[k + 1] - c[k] for k in _PROJECTIONS)


def _attention_call(model: Any, i: int, h: torch.Tensor, cache: Any, s0: int, latent_eps: float) -> tuple | None:
    """attention_step's arguments for layer i after h (norms, eps, proj, kvb, main, spill, table, scale) and
    a clock for it, or None where the one call does not apply."""
    if h.shape[0] > MLA_MAX_TOKENS or not hasattr(cache, "step_pages"):
        return None
    args = model.cpu_steps.get(i)
    if args is None:
        args = model.cpu_steps[i] = _layer_args(model, i, h, latent_eps) or False
    if args is False:
        return None
    norms, eps, proj, kvb, kvb_t, scale, clock = args
    pages = cache.step_pages(i, s0, h.shape[0], kvb_t)
    return None if pages is None else (norms, eps, proj, kvb, *pages, scale, clock)


def _layer_args(model: Any, i: int, h: torch.Tensor, latent_eps: float) -> tuple | None:
    """Layer i's arguments for attention_step, or None where its weights are not held as the GEMVs read
    them (or the norms are not fp32)."""
    layer = model.weights.layers[i]
    a = layer.self_attn
    ws = decode_weights(h, (a.q_a_proj, a.kv_a_proj_with_mqa, a.q_b_proj, a.o_proj))
    norms = (layer.input_layernorm, a.q_a_layernorm, a.kv_a_layernorm, layer.post_attention_layernorm)
    kvb_t = a.kv_b_heads
    if ws is None or any(n.dtype != torch.float32 or n.device.type != "cpu" for n in norms) \
            or kvb_t.dtype not in (torch.float32, torch.bfloat16) or not kvb_t.is_contiguous():
        return None
    kvb = kvb_t.view(torch.int16).numpy().view(np.uint16) if kvb_t.dtype == torch.bfloat16 else kvb_t.numpy()
    proj = tuple(arr for pair in ws for arr in pair)
    eps = (np.float32(model.cfg.rms_norm_eps), np.float32(latent_eps))
    return (tuple(n.numpy() for n in norms), eps, proj, kvb, kvb_t, np.float32(model.cfg.softmax_scale),
            np.empty(PARTS, np.int64))


def moe(model: Any, i: int, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """h + Model.moe(i, x) in one call, for MoE layer i of model; its parts' times added to model.times
    (router, shared, experts_wait) and the experts' call reported to the backend (record_decode); None
    where it does not apply (the caller takes the separate steps)."""
    if not _decode_rows(x) or (got := _moe_call(model, i, x)) is None:
        return None
    args, ent, clock = got
    t0 = time.perf_counter()
    h2, distinct = moe_step(np.ascontiguousarray(h.numpy()), np.ascontiguousarray(x.numpy()), *args,
                            numba.get_num_threads(), ent, clock)
    wall = time.perf_counter() - t0
    c = clock.tolist()  # Python numbers: each NumPy call costs tens of us with the caches cold
    _add_moe_times(model, i, x.shape[0], c, wall / (c[4] - c[0]) if c[4] > c[0] else 0.0, wall, distinct)
    return torch.from_numpy(h2)


def _add_moe_times(model: Any, i: int, T: int, c: list[int], per_cycle: float, wall: float, distinct: int) -> None:
    """A moe_step call's parts (stamps c, seconds a cycle) into model.times, its experts to the backend."""
    times = model.times
    times.router += (c[1] - c[0]) * per_cycle
    times.shared += (c[2] - c[1]) * per_cycle
    times.experts_wait += (c[4] - c[2]) * per_cycle if per_cycle else wall
    model.experts.record_decode(i, T, distinct, (c[3] - c[2]) * per_cycle)


def _moe_call(model: Any, i: int, x: torch.Tensor) -> tuple | None:
    """((router, bias, route, shared, experts, counts) as moe_step takes them, the experts' threads, a clock)
    for MoE layer i after x, or None where the one call does not apply."""
    T = x.shape[0]
    if model.defer_experts or (got := model.experts.decode_table(i, T)) is None:
        return None
    table, ent, counts = got
    args = model.cpu_steps.get(("moe", i))
    if args is None or args[0] is not table:  # per table: the weights, a clock, moe_into's options per T
        args = model.cpu_steps[("moe", i)] = (table, _moe_args(model, i, x, table), np.empty(MOE_PARTS, np.int64), {})
    table, weights, clock, options = args
    if weights is None:
        return None
    router, bias, route, shared, base = weights
    if (experts := options.get(T)) is None:
        experts = options[T] = (base, table.loc, table.hidden, table.inter, *kernel_options(T))
    return (router, bias, route, shared, experts, counts), ent, clock


def dense(model: Any, i: int, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """h + Model.dense_mlp(i, x) in one call, for dense layer i of model; None where it does not apply."""
    if not _decode_rows(x) or (args := _dense_call(model, i, x)) is None:
        return None
    return torch.from_numpy(mlp_step(np.ascontiguousarray(h.numpy()), np.ascontiguousarray(x.numpy()), args,
                                     numba.get_num_threads()))


def _dense_call(model: Any, i: int, x: torch.Tensor) -> tuple | None:
    """Dense layer i's SwiGLU as mlp_step takes it, or None where the one call does not apply."""
    args = model.cpu_steps.get(("dense", i))
    if args is None:
        args = model.cpu_steps[("dense", i)] = _mlp_args(x, model.weights.layers[i].mlp) or False
    return None if args is False else args


def _decode_rows(x: torch.Tensor) -> bool:
    """x is a decode step's few fp32 rows on a CPU the fused kernels run on."""
    return x.is_cpu and x.dtype == torch.float32 and 1 <= x.shape[0] <= MAX_ROWS and host_has_avx2()


def _mlp_args(x: torch.Tensor, m: Any) -> tuple | None:
    """A SwiGLU's weights as moe_step's swiglu_into_out reads them, or None where they are not held so."""
    ws = decode_weights(x, (m.gate_proj, m.up_proj, m.down_proj))
    if ws is None or not swiglu_fits(ws):
        return None
    return tuple(arr for pair in ws for arr in pair)


def _moe_args(model: Any, i: int, x: torch.Tensor, table: Any) -> tuple | None:
    """MoE layer i's arguments for moe_step over the backend's table (every expert checked inside its
    arena once: the maps do not move), or None where its router or shared expert is not held as the
    kernels read them."""
    c, mlp = model.cfg, model.weights.layers[i].mlp
    gate = mlp.gate
    shared = _mlp_args(x, mlp.shared_experts) if mlp.shared_experts is not None else None
    if shared is None or c.n_group != 1 or gate.weight.dtype != torch.bfloat16 or gate.weight.device.type != "cpu" \
            or not gate.weight.is_contiguous() or gate.e_score_correction_bias.dtype != torch.float32 \
            or gate.e_score_correction_bias.device.type != "cpu" or table.hidden != c.hidden_size:
        return None
    table.check_experts(np.arange(c.n_routed_experts))
    route = (min(c.num_experts_per_tok, c.n_routed_experts), bool(c.norm_topk_prob), np.float32(c.routed_scaling_factor))
    return (bf16_bits(gate.weight), gate.e_score_correction_bias.numpy(), route, shared, table.arena_addresses()[0])
