"""The hot experts of a decode token as two fused Triton kernels over the packed INT4 layout.

Owns fused_hot_moe, over plain tensors: stacked expert slots and the device-side expert -> slot map
(hybrid.experts.hot.HotSlots holds them and passes them in). CUDA only in use; the tests run it in
Triton's interpreter (TRITON_INTERPRET=1, set before this module is imported) against kernels_gpu.int4
and compile it for real GPUs. Imports nothing from hybrid/.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 32  # output rows per program
BLOCK_WORDS = 16  # packed words (x8 columns) per step of the reduction


@triton.jit
def _bf16_bits_to_f32(bits):
    return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _int4_rows_dot(packed_ptr, scale_ptr, base_w, base_s, rows, rmask, live, v_ptr, n_words, n_groups,
                   GROUP_WORDS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr):
    """sum over columns of dequant(W[rows, :]) * v for one matrix: -> fp32 [BLOCK_R] (zeros when live is 0)."""
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for w0 in range(0, n_words * live, BLOCK_W):  # a cold pair (live 0) skips the loop, arithmetic included
        words = w0 + tl.arange(0, BLOCK_W)
        wmask = words < n_words
        m = rmask[:, None] & wmask[None, :]
        q = tl.load(packed_ptr + base_w + rows[:, None] * n_words + words[None, :], mask=m, other=0)  # [R, W]
        sc = tl.load(scale_ptr + base_s + rows[:, None] * n_groups + (words // GROUP_WORDS)[None, :], mask=m, other=0)
        part = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
        for k in tl.static_range(8):  # column 8w+k of every word: nibble k, times v[8w+k]
            v = tl.load(v_ptr + words * 8 + k, mask=wmask, other=0.0)  # [W]
            part += (((q >> (4 * k)) & 0xF) - 8).to(tl.float32) * v[None, :]
        acc += tl.sum(part * _bf16_bits_to_f32(sc), axis=1)
    return acc


@triton.jit
def _gate_up_kernel(x_ptr, ids_ptr, w_ptr, slot_ptr, gp_ptr, gs_ptr, up_ptr, us_ptr, h_ptr,
                    K, D, FF, GROUP_WORDS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr):
    pair, rb = tl.program_id(0), tl.program_id(1)
    s = tl.load(slot_ptr + tl.load(ids_ptr + pair))
    live = ((s >= 0) & (tl.load(w_ptr + pair) != 0)).to(tl.int32)
    s64 = tl.maximum(s, 0).to(tl.int64)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    inside = rows < FF
    read = rows < FF * live  # no row of a cold pair is read (a bool scalar & a tensor is no mask in the interpreter)
    n_words, n_groups = D // 8, D // (GROUP_WORDS * 8)
    x_row = x_ptr + (pair // K).to(tl.int64) * D
    g = _int4_rows_dot(gp_ptr, gs_ptr, s64 * FF * n_words, s64 * FF * n_groups, rows, read, live, x_row,
                       n_words, n_groups, GROUP_WORDS, BLOCK_W, BLOCK_R)
    u = _int4_rows_dot(up_ptr, us_ptr, s64 * FF * n_words, s64 * FF * n_groups, rows, read, live, x_row,
                       n_words, n_groups, GROUP_WORDS, BLOCK_W, BLOCK_R)
    h = g / (1.0 + tl.exp(-g)) * u  # silu(gate) * up; 0 for a cold pair
    tl.store(h_ptr + pair.to(tl.int64) * FF + rows, h, mask=inside)


@triton.jit
def _down_kernel(h_ptr, ids_ptr, w_ptr, slot_ptr, dp_ptr, ds_ptr, out_ptr,
                 D, FF, GROUP_WORDS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr):
    pair, rb = tl.program_id(0), tl.program_id(1)
    s = tl.load(slot_ptr + tl.load(ids_ptr + pair))
    weight = tl.load(w_ptr + pair)
    live = ((s >= 0) & (weight != 0)).to(tl.int32)
    s64 = tl.maximum(s, 0).to(tl.int64)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    inside = rows < D
    read = rows < D * live
    n_words, n_groups = FF // 8, FF // (GROUP_WORDS * 8)
    y = _int4_rows_dot(dp_ptr, ds_ptr, s64 * D * n_words, s64 * D * n_groups, rows, read, live,
                       h_ptr + pair.to(tl.int64) * FF, n_words, n_groups, GROUP_WORDS, BLOCK_W, BLOCK_R)
    tl.store(out_ptr + pair.to(tl.int64) * D + rows, weight * live.to(tl.float32) * y, mask=inside)


def fused_hot_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, slot_of: torch.Tensor,
                  packed: Mapping[str, torch.Tensor], scale: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """x [T, D], ids [T, K], weights [T, K] on the slots' device -> y_hot fp32 [T, D]: the sum over the
    pairs whose expert is hot (slot_of[expert] >= 0) of weights * expert(x), accumulated in fp32.
    Equal to kernels_gpu.int4.hot_expert_moe's y_hot up to fp32 summation order.

    The slots, S of them, each an expert in the checkpoint's INT4 layout (kernels_gpu.int4), for p in
    gate [F, D], up [F, D], down [D, F]: packed[p] int32 [S, O, I/8], scale[p] bf16 [S, O, I/G];
    slot_of int32 [E]: an expert's slot, -1 where it is not hot.

    The expert ids are read on the device and each tile is dequantised inside the GEMV, so a hot
    pair's packed weights are read once and a cold pair reads nothing; fixed shapes, no host sync,
    so a CUDA graph can hold it. Kernel 1, per (pair, block of F rows): h = silu(gate x) * up x,
    fp32 [T*K, F]. Kernel 2, per (pair, block of D rows): weight * down h, fp32 [T*K, D]; summed
    over K here. A packed word holds 8 consecutive columns (low nibble first, q + 8): a tile is
    loaded once as [rows, words] and its 8 nibbles taken in turn against columns 8w + k. Scales
    arrive as bf16 bit patterns (int16) and are widened by a shift, the same on every backend."""
    T, K = ids.shape
    FF, D = packed["gate"].shape[1], 8 * packed["gate"].shape[2]  # gate [S, F, D/8]
    if x.shape != (T, D) or weights.shape != (T, K):
        raise ValueError(f"fused_hot_moe: x {tuple(x.shape)}, ids {tuple(ids.shape)}, weights "
                         f"{tuple(weights.shape)} do not fit hidden {D}")
    xf = x.float().contiguous()
    idl = ids.long().contiguous()
    wf = weights.float().contiguous()
    h = torch.empty(T * K, FF, device=x.device, dtype=torch.float32)
    out = torch.empty(T * K, D, device=x.device, dtype=torch.float32)
    gw = D // scale["gate"].shape[2] // 8  # packed words per group
    p, sc = packed, {k: v.view(torch.int16) for k, v in scale.items()}
    _gate_up_kernel[(T * K, triton.cdiv(FF, BLOCK_ROWS))](
        xf, idl, wf, slot_of, p["gate"], sc["gate"], p["up"], sc["up"], h, K, D, FF,
        GROUP_WORDS=gw, BLOCK_W=BLOCK_WORDS, BLOCK_R=BLOCK_ROWS)
    _down_kernel[(T * K, triton.cdiv(D, BLOCK_ROWS))](
        h, idl, wf, slot_of, p["down"], sc["down"], out, D, FF,
        GROUP_WORDS=gw, BLOCK_W=BLOCK_WORDS, BLOCK_R=BLOCK_ROWS)
    return out.view(T, K, D).sum(1)
