"""Int8 weight-only GEMV for decode: a Triton kernel that reads the int8 codes once.

Owns int8_gemv. CUDA only in use (kernels_gpu.int8.int8_linear picks it for up to MAX_TOKENS rows);
the tests run it in Triton's interpreter (TRITON_INTERPRET=1, set before this module is imported)
against the dequantising path and compile it for real GPUs. Imports nothing from hybrid/.
Letters: T rows of x (tokens), O out features, I in features.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TOKENS = 4  # rows of x one call takes: decode steps; longer inputs are matmuls, not GEMVs
# 16 x 128 int8 per step over 4 warps: 16 B per thread per load, and ptxas (sm_86) allocates 46 registers
# a thread, so an SM runs its full complement of warps to hide DRAM latency (32 x 128 took 157 registers)
BLOCK_ROWS = 16  # output rows per program
BLOCK_COLS = 128  # int8 columns per step of the reduction (128 B of each row)


@triton.jit
def _int8_gemv_kernel(x_ptr, q_ptr, s_ptr, y_ptr, T, O, I,
                      BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < O
    tix = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)  # T == 1: products summed across steps, reduced once
    for c0 in range(0, I, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < I
        w = tl.load(q_ptr + rows[:, None].to(tl.int64) * I + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0).to(tl.float32)  # [R, C], read once for all T rows of x
        if BLOCK_T == 1:
            acc1 += w * tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        else:
            for t in tl.static_range(BLOCK_T):
                xt = tl.load(x_ptr + t * I + cols, mask=cmask & (cols * 0 + t < T), other=0.0).to(tl.float32)
                part = tl.sum(w * xt[None, :], axis=1)  # [R]
                acc = tl.where(tix[:, None] == t, acc + part[None, :], acc)
    if BLOCK_T == 1:
        acc = tl.sum(acc1, axis=1)[None, :]
    scale = (tl.load(s_ptr + rows, mask=rmask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    y = acc * scale[None, :]
    tl.store(y_ptr + tix[:, None] * O + rows[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(tix[:, None] < T) & rmask[None, :])


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, I] (T <= MAX_TOKENS), qweight int8 [O, I], scale bf16 [O] -> x @ (qweight * scale[:, None]).T
    [T, O] in x's dtype. Accumulates in fp32 and scales before the one rounding to x's dtype, so it
    is at least as exact as the dequantising path. Fixed shapes and no host sync: a CUDA graph can
    hold it. The scale arrives as bf16 bit patterns (int16) and is widened by a shift."""
    T, I = x.shape
    O = qweight.shape[0]
    if not 1 <= T <= MAX_TOKENS or qweight.shape != (O, I) or scale.shape != (O,):
        raise ValueError(f"int8_gemv: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, scale {tuple(scale.shape)}: "
                         f"want x [T <= {MAX_TOKENS}, I], qweight [O, I], scale [O]")
    if scale.dtype != torch.bfloat16 or qweight.dtype != torch.int8:
        raise ValueError(f"int8_gemv: qweight must be int8 and scale bf16 (kernels_gpu.int8.quantize_int8), "
                         f"got {qweight.dtype} and {scale.dtype}")
    x = x.contiguous()
    y = torch.empty(T, O, device=x.device, dtype=x.dtype)
    _int8_gemv_kernel[(triton.cdiv(O, BLOCK_ROWS),)](
        x, qweight.contiguous(), scale.contiguous().view(torch.int16), y, T, O, I,
        BLOCK_T=triton.next_power_of_2(T), BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS)
    return y
