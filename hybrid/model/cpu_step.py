"""A CPU decode step's attention block in one Numba call (kernels_cpu.attn_step), where it applies.

Owns the choice (the GPU side on the CPU in fp32, a decode step's few tokens, the paged cache's one-call
MLA, the attention's linears all bf16 or all int8 held as widen's GEMVs read them), the per-layer
arguments (numpy views of the weights, built once) and the split of the call's wall time between the
attention projections and the rest, for the bench's account. The result is Model.attention_block's,
bit for bit: the same kernels in the same order.
"""
from __future__ import annotations

import time
from typing import Any

import numba
import numpy as np
import torch

from kernels_cpu.attn_step import PARTS, attention_step
from kernels_cpu.mla import MAX_TOKENS as MLA_MAX_TOKENS
from kernels_cpu.simd import host_has_avx2
from kernels_cpu.widen import MAX_ROWS

from hybrid.model.linear import decode_weights

_PROJECTIONS = (1, 3, 5)  # attention_step's steps that are products: q_a with kv_a, q_b, o_proj


def attention(model: Any, i: int, h: torch.Tensor, cache: Any, s0: int, cos: torch.Tensor, sin: torch.Tensor,
              latent_eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Model.attention_block for layer i of model (a hybrid.model.k2.Model) over the absorbed MLA in one call: (h + attention, the
    post-attention RMSNorm of it), with the projections' share of the time added to
    model.times.attention_proj; None where it does not apply (the caller takes the separate steps)."""
    T = h.shape[0]
    if h.device.type != "cpu" or h.dtype != torch.float32 or not 1 <= T <= min(MAX_ROWS, MLA_MAX_TOKENS) \
            or not hasattr(cache, "step_pages") or not host_has_avx2():
        return None
    args = model.cpu_steps.get(i)
    if args is None:
        args = model.cpu_steps[i] = _layer_args(model, i, h, latent_eps) or False
    if args is False:
        return None
    norms, eps, proj, kvb, kvb_t, scale = args
    pages = cache.step_pages(i, s0, T, kvb_t)
    if pages is None:
        return None
    nt = numba.get_num_threads()
    clock = np.empty(PARTS, np.int64)
    t0 = time.perf_counter()
    h2, x2 = attention_step(np.ascontiguousarray(h.numpy()), norms, eps, proj, kvb, *pages, s0, cos.numpy(),
                            sin.numpy(), scale, nt, max(1, min(nt, kvb.shape[0] // 4)), clock)
    wall = time.perf_counter() - t0
    steps = np.diff(clock)
    if steps.sum() > 0:
        model.times.attention_proj += wall * float(steps[list(_PROJECTIONS)].sum() / steps.sum())
    return torch.from_numpy(h2), torch.from_numpy(x2)


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
    return (tuple(n.numpy() for n in norms), eps, proj, kvb, kvb_t, np.float32(model.cfg.softmax_scale))
