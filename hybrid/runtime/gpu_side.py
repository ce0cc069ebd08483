"""The non-expert weights as the engine holds them: placed, converted and, in host RAM, on huge pages.

Owns gpu_side_weight (one checkpoint tensor -> what the model computes with, as the plan counts it)
and host_copy (a tensor's own copy in host RAM on transparent huge pages). engine.py calls it once
per tensor at load; nothing here runs per token.

Why huge pages: a decode step on a CPU streams every weight once, and with 4 KB pages that stream
costs a page walk per 4 KB and restarts the hardware prefetchers at every page. torch's allocator
gives plain pages (the kernel's THP setting is usually 'madvise'); numpy asks for huge pages
(madvise) on blocks from 4 MB. k2-slice's dense SwiGLU (793 MB) in one sitting on a 2-core Xeon
with AMX: 28-29 GB/s from such a copy, 25.5-26.5 from torch's (the RAM read probe: 36 GB/s on huge
pages, 28-29 on plain ones).
"""
from __future__ import annotations

import numpy as np
import torch

from kernels_gpu.int8 import quantize_int8

from hybrid.runtime.tensor_classes import int8_eligible, widen_eligible

EMBED = "model.embed_tokens.weight"


def host_copy(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t converted to dtype (default: its own) in new host memory that numpy allocated: from 4 MB
    numpy marks it for transparent huge pages, which the kernel gives where its setting allows
    ('always' or 'madvise'; with 'never' these are plain pages, as torch's would be). Shares
    nothing with t (a view of the checkpoint's maps stays behind)."""
    dtype = dtype or t.dtype
    size = t.numel() * dtype.itemsize
    if size == 0:
        return torch.empty(t.shape, dtype=dtype)
    return torch.from_numpy(np.empty(size, np.uint8)).view(dtype).view(t.shape).copy_(t)


def gpu_side_weight(name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype, int8: bool = False,
                    bf16w: bool = False):
    """A non-expert checkpoint tensor as the model holds it, placed as the plan counts it:
    the router's bias in fp32 (F32 on disk; rounding it moves routing decisions), the embedding in
    host RAM as stored (a step needs one row: Model.embed), with int8 the plan's int8 weights
    (placement.int8_eligible) quantised on the host so the device never holds their bf16 copy, with
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
        return (host_copy(q), scale) if cpu else (q.to(device), scale.to(device))
    if bf16w and t.dtype == torch.bfloat16 and widen_eligible(name, tuple(t.shape)):
        return host_copy(t) if cpu else t.to(device).clone()
    return host_copy(t, dtype) if cpu else t.to(device, dtype)
