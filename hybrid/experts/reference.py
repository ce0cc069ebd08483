"""The reference expert backend: the oracle every faster backend is tested against.

Dequantises each chosen expert with the compressed-tensors rule (q * scale, exact in fp32) and runs
fp32 matmuls in torch. Slow by design: obviously correct, no caching, no threads, and none of the
optional features of ExpertBackend (its defaults: no host hops, prefetch, hot experts or counts).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid.checkpoint.reader import Checkpoint
from hybrid.checkpoint.int4 import dequantize_int4
from hybrid.experts.backend import ExpertBackend, Handle


class ReferenceExperts(ExpertBackend):
    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    def dequantized(self, layer: int, expert: int, proj: str) -> torch.Tensor:
        w = self.ckpt.expert(layer, expert, proj)
        return torch.from_numpy(dequantize_int4(w.packed, w.scale, w.shape))  # [out, in] fp32

    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Handle:
        return layer, x, ids, weights

    def wait(self, handle: Handle) -> torch.Tensor:
        layer, x, ids, weights = handle
        x32 = x.float().cpu()
        y = torch.zeros_like(x32)  # [T, D]
        for e in torch.unique(ids).tolist():
            tok, slot = torch.nonzero(ids.cpu() == e, as_tuple=True)
            xe = x32[tok]
            g, u, d = (self.dequantized(layer, e, p) for p in ("gate_proj", "up_proj", "down_proj"))
            ye = (F.silu(xe @ g.T) * (xe @ u.T)) @ d.T
            y.index_add_(0, tok, ye * weights.float().cpu()[tok, slot, None])
        return y.to(x.device)
