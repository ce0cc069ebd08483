"""The fixed buffers a decode step's segments share (hybrid/runtime/decode_step.py runs them).

Owns their shapes and where they live: device buffers the segments read and write with copy_, and
pinned host buffers (with numpy views) for the hop to the CPU experts. Allocated once per decoder,
outside any graph pool; computes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hybrid.model.k2 import Model


@dataclass(frozen=True)
class StepBuffers:
    """One token's tensors. A segment never rebinds them, so a replayed graph and an eager run move
    data the same way, every bucket's graphs share them, and the host reads a layer's x / ids / w
    before the next segment overwrites them. Letters as in hybrid.model.k2; W prefetch width."""
    # on the host, pinned with CUDA (in-graph copies to or from the host need pinned pages)
    tp_h: torch.Tensor  # [2] int64: this step's token id and position
    emb_h: torch.Tensor  # [1, D] compute dtype: its embedding row (the table may live in host RAM)
    x_h: torch.Tensor  # [1, D] fp32: the MoE layer's input, for the CPU experts
    ids_h: torch.Tensor  # [1, K] int64
    w_h: torch.Tensor  # [1, K] fp32
    routed_h: torch.Tensor  # [1, D] fp32: the CPU's share of the routed sum
    cand_h: torch.Tensor  # [W] int64: the next MoE layer's candidate experts (prefetch)
    # numpy views of the host buffers, made once: what the CPU expert kernels read and write
    x_np: np.ndarray
    ids_np: np.ndarray
    w_np: np.ndarray
    routed_np: np.ndarray
    cand_np: np.ndarray
    # on the device
    s0: torch.Tensor  # [] int64: the position
    cos: torch.Tensor  # [1, R/2] fp32
    sin: torch.Tensor  # [1, R/2] fp32
    h: torch.Tensor  # [1, D] compute dtype: the residual stream
    x: torch.Tensor  # [1, D] compute dtype: the MoE layer's input
    ids: torch.Tensor  # [1, K] int64
    w: torch.Tensor  # [1, K] fp32
    shared: torch.Tensor  # [1, D] compute dtype: the shared expert's output
    routed: torch.Tensor  # [1, D] fp32: the GPU side's share of the routed sum (hot experts)
    logits: torch.Tensor  # [1, vocab] fp32

    @classmethod
    def allocate(cls, model: Model, pinned: bool, width: int) -> "StepBuffers":
        """Zeroed buffers for `model`; pinned: page-lock the host ones (CUDA); width: W."""
        cfg, dev, dt, f32 = model.cfg, model.device, model.dtype, torch.float32
        D, K, R = cfg.hidden_size, cfg.num_experts_per_tok, cfg.qk_rope_head_dim

        def host(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            t = torch.zeros(shape, dtype=dtype)
            return t.pin_memory() if pinned else t

        def device(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, device=dev, dtype=dtype)

        x_h, ids_h, w_h = host((1, D), f32), host((1, K), torch.long), host((1, K), f32)
        routed_h, cand_h = host((1, D), f32), host((width,), torch.long)
        return cls(tp_h=host((2,), torch.long), emb_h=host((1, D), dt), x_h=x_h, ids_h=ids_h, w_h=w_h,
                   routed_h=routed_h, cand_h=cand_h, x_np=x_h.numpy(), ids_np=ids_h.numpy(), w_np=w_h.numpy(),
                   routed_np=routed_h.numpy(), cand_np=cand_h.numpy(),
                   s0=device((), torch.long), cos=device((1, R // 2), f32), sin=device((1, R // 2), f32),
                   h=device((1, D), dt), x=device((1, D), dt), ids=device((1, K), torch.long), w=device((1, K), f32),
                   shared=device((1, D), dt), routed=device((1, D), f32), logits=device((1, cfg.vocab_size), f32))
