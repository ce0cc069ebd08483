"""compressed-tensors pack-quantized INT4 (symmetric, group-wise): quantise, pack, unpack, dequantise.

Owns the bit layout on the numpy side (dequantising goes through kernels_gpu.int4, the one copy of
that); it never reads files. Layout (Kimi K2 routed experts):
  weight_packed int32 [out, in/8]: column 8j+k in bits 4k..4k+3 of word j, stored as q + 8 (0..15)
  weight_scale  bf16  [out, in/G]: one scale per row and group of G consecutive input columns
  w[o, i] = (nibble - 8) * scale[o, i // G]
"""
from __future__ import annotations

import numpy as np
import torch

from kernels_gpu.int4 import DeviceInt4, dequantize

INT4_MIN, INT4_MAX = -8, 7


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int codes in [-8, 7], [out, in] (in % 8 == 0) -> int32 [out, in/8]."""
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] % 8:
        raise ValueError(f"pack_int4 needs [out, in] with in % 8 == 0, got {q.shape}")
    if q.size and (q.min() < INT4_MIN or q.max() > INT4_MAX):
        raise ValueError("pack_int4: codes must lie in [-8, 7]")
    u = (q.astype(np.int64) + 8).reshape(q.shape[0], -1, 8)  # [out, in/8, 8]
    shifts = np.arange(8, dtype=np.int64) * 4
    words = (u << shifts).sum(axis=-1)  # 0 .. 2^32-1
    return words.astype(np.uint32).view(np.int32)


def unpack_int4(packed: np.ndarray, in_features: int | None = None) -> np.ndarray:
    """int32 [out, in/8] -> int8 codes [out, in] in [-8, 7]; `in_features` trims padding."""
    w = np.asarray(packed).view(np.uint32)
    shifts = np.arange(8, dtype=np.uint32) * 4
    nib = (w[..., None] >> shifts) & 0xF  # [out, in/8, 8]
    q = nib.astype(np.int8).reshape(w.shape[0], -1) - np.int8(8)
    return q if in_features is None else q[:, :in_features]


def bf16_to_f32(x: np.ndarray) -> np.ndarray:
    """bf16 bits held as uint16 (or int16) -> float32, exactly."""
    return (np.asarray(x).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits as uint16, round to nearest even (what torch does)."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def quantize_int4(w: np.ndarray, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """fp32 [out, in] -> (packed int32 [out, in/8], scale bf16-bits uint16 [out, in/group]).

    Symmetric min-max: scale = absmax / 7 per group, rounded to bf16 first so that
    q = round(clamp(w / scale, -8, 7)) uses exactly the stored scale.
    """
    out_f, in_f = w.shape
    if in_f % group:
        raise ValueError(f"quantize_int4: in={in_f} is not a multiple of group {group}")
    g = w.astype(np.float32).reshape(out_f, in_f // group, group)
    amax = np.abs(g).max(axis=-1)
    scale_bits = f32_to_bf16(np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32))
    scale = bf16_to_f32(scale_bits)
    q = np.rint(np.clip(g / scale[..., None], INT4_MIN, INT4_MAX)).astype(np.int8)
    return pack_int4(q.reshape(out_f, in_f)), scale_bits


def dequantize_int4(packed: np.ndarray, scale_bits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """fp32 [out, in] (exact: |q| <= 8 times a bf16 scale), for numpy callers: kernels_gpu.int4.dequantize
    (the one dequantisation) on copies of the arrays (checkpoint memmaps are read-only)."""
    w = DeviceInt4.from_arrays(packed, scale_bits, shape)
    return dequantize(w.packed, w.scale, w.out_features, w.in_features, w.in_features // w.scale.shape[1]).numpy()
