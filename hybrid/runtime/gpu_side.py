"""The non-expert weights as the engine holds them: placed, converted and, in host RAM, on huge pages.

Owns gpu_side_weight (one checkpoint tensor -> what the model computes with, as the plan counts it),
host_copy (a tensor's own copy in host RAM on transparent huge pages) and host_tiles (int8 codes copied
as kernels_cpu.int8tiles' tiles, likewise). engine.py calls it once
per tensor at load; nothing here runs per token.

Why huge pages: a decode step on a CPU streams every weight once, and with 4 KB pages that stream
costs a page walk per 4 KB and restarts the hardware prefetchers at every page. torch's allocator
gives plain pages (the kernel's THP setting is usually 'madvise'). k2-slice's dense SwiGLU (793 MB)
in one sitting on a 2-core Xeon with AMX: 28-29 GB/s from a huge-page copy, 25.5-26.5 from torch's
(the RAM read probe: 36 GB/s on huge pages, 28-29 on plain ones). Each copy of HUGE or more gets
a mapping of its own, 2 MB aligned and advised before its first touch: numpy's own advice (blocks from
4 MB) did not hold, since malloc serves blocks up to 32 MB from memory freed earlier in the load, already
in 4 KB pages (k2-slice int8w: kv_a, kv_b, q_a, q_b and the shared experts sat there on 0-60% huge pages).
"""
from __future__ import annotations

import numpy as np
import torch

from kernels_cpu import int8tiles
from kernels_gpu.int8 import quantize_int8

from hybrid.checkpoint.host_memory import huge_bytes
from hybrid.runtime.tensor_classes import int8_eligible, widen_eligible

EMBED = "model.embed_tokens.weight"


def host_copy(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t converted to dtype (default: its own) in new host memory marked for transparent huge pages
    (huge_bytes), which the kernel gives where its setting allows ('always' or 'madvise'; with
    'never' these are plain pages, as torch's would be). Shares nothing with t (a view of the
    checkpoint's maps stays behind)."""
    dtype = dtype or t.dtype
    size = t.numel() * dtype.itemsize
    if size == 0:
        return torch.empty(t.shape, dtype=dtype)
    return torch.from_numpy(huge_bytes(size)).view(dtype).view(t.shape).copy_(t)


def host_tiles(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [O, I] (int8tiles.usable) as int8tiles lays them out, 4-D, in new host memory on huge pages
    (as host_copy): a decode step's GEMV reads them in that order (int8tiles.py: +2-14% on K2's rows of 7 KB
    and longer, 2-core Xeon); a reader that was not taught tiles fails on the rank instead of misreading."""
    tiles = huge_bytes(q.numel()).view(np.int8).reshape(int8tiles.tiles_shape(*q.shape))
    int8tiles.tile_into(np.ascontiguousarray(q.numpy()), tiles)
    return torch.from_numpy(tiles)


def gpu_side_weight(name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype, int8: bool = False,
                    bf16w: bool = False):
    """A non-expert checkpoint tensor as the model holds it, placed as the plan counts it:
    the router's bias in fp32 (F32 on disk; rounding it moves routing decisions), the embedding in
    host RAM as stored (a step needs one row: Model.embed), with int8 the plan's int8 weights
    (placement.int8_eligible) quantised on the host so the device never holds their bf16 copy (on the CPU,
    as tiles where the shape fits: host_tiles), with
    bf16w (a CPU computing in fp32) the weights of placement.widen_eligible kept in bf16 as stored
    (linear.linear widens them inside each product), and the rest in `dtype` on `device`. What
    stays in host RAM is a host_copy (its own memory, on huge pages)."""
    cpu = device.type == "cpu"
    if name.endswith("e_score_correction_bias"):
        return t.to(device, torch.float32)
    if name == EMBED:
        return host_copy(t)
    if int8 and int8_eligible(name, tuple(t.shape)):
        q, scale = quantize_int8(t)
        tiles = dtype == torch.float32 and int8tiles.usable(*q.shape)  # int8w: fp32 math, linear.py's CPU paths
        return (host_tiles(q) if tiles else host_copy(q), scale) if cpu else \
            (q.to(device), scale.to(device))
    if bf16w and t.dtype == torch.bfloat16 and widen_eligible(name, tuple(t.shape)):
        return host_copy(t) if cpu else t.to(device).clone()
    return host_copy(t, dtype) if cpu else t.to(device, dtype)
