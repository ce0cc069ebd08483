"""Dequantising INT4 linear layers and the hot-expert half of a MoE layer, in torch on any device.

Owns computing routed experts that sit on the GPU ("hot") from the checkpoint's own packed layout
(no repacking), and the exact split of a layer's (token, slot) pairs between those and the CPU.
Pure functions on tensors; imports nothing from hybrid/. The one INT4 dequantisation (dequantize; the
checkpoint layer's numpy dequantize_int4 calls it). No Triton here: the fused decode kernel is
kernels_gpu.int4_triton, imported lazily, tested against these functions.
Layout: packed int32 [O, I/8], column 8j+k in bits 4k..4k+3 of word j as q + 8; scale bf16 [O, I/G].
Letters: T tokens, K slots (experts per token), D hidden, F expert intermediate, O out, I in, G group.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


class DeviceInt4(NamedTuple):
    """One INT4 projection resident on a device."""

    packed: torch.Tensor  # int32 [O, I/8]
    scale: torch.Tensor  # bf16 [O, I/G]
    out_features: int
    in_features: int

    @classmethod
    def from_arrays(cls, packed: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor,
                    shape: tuple[int, int], device: torch.device | str = "cpu") -> "DeviceInt4":
        """Copy the on-disk arrays (packed int32, scale as bf16 bits in uint16/int16, or bf16) to `device`."""
        if isinstance(packed, np.ndarray):  # torch.tensor copies: checkpoint memmaps are read-only
            packed = torch.tensor(np.asarray(packed).view(np.int32))
        if isinstance(scale, np.ndarray):
            scale = torch.tensor(np.asarray(scale).view(np.int16))
        return cls(packed.to(device), as_bf16(scale.to(device)), int(shape[0]), int(shape[1]))

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * 4 + self.scale.numel() * 2


ExpertWeights = tuple[DeviceInt4, DeviceInt4, DeviceInt4]  # gate [F, D], up [F, D], down [D, F]


def as_bf16(scale: torch.Tensor) -> torch.Tensor:
    """Scales given as bf16, or as their bit patterns in int16 / uint16, -> bf16 (no copy for bits)."""
    if scale.dtype == torch.bfloat16:
        return scale
    if scale.dtype in (torch.int16, torch.uint16):
        return scale.view(torch.bfloat16)
    raise TypeError(f"INT4 scales must be bf16 or bf16 bits in int16/uint16, got {scale.dtype}")


def dequantize(packed: torch.Tensor, scale: torch.Tensor, out_features: int, in_features: int,
               group: int = 32, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed int32 [O, I/8] + scale [O, I/G] -> w [O, I] in `dtype`, unpacked on packed's device.

    Exact in fp32 (|q| <= 8 times a bf16 scale); in bf16 each weight is rounded once.
    """
    O, I = out_features, in_features
    if packed.shape != (O, I // 8) or I % 8 or I % group or scale.shape != (O, I // group):
        raise ValueError(f"INT4 [{O}, {I}] group {group} needs packed [{O}, {I // 8}] and scale "
                         f"[{O}, {I // group}]; got {tuple(packed.shape)} and {tuple(scale.shape)}")
    # little-endian bytes of word j are columns (8j, 8j+1), (8j+2, 8j+3), ...: low nibble first
    b = packed.contiguous().view(torch.uint8)  # [O, I/2]
    nib = torch.stack((b & 0xF, b >> 4), dim=-1).view(O, I // group, group)  # uint8 0..15
    w = (nib.to(dtype) - 8) * as_bf16(scale).to(dtype)[..., None]  # [O, I/G, G]
    return w.view(O, I)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_features: int,
                in_features: int, group: int = 32) -> torch.Tensor:
    """x [..., I] @ dequant(packed, scale).T -> [..., O], computed in x's dtype on x's device.

    The tile is dequantised once per call, so one call over all of a hot expert's tokens (prefill)
    costs one unpack; decode (one token) is a GEMV whose traffic is dominated by the unpacked tile.
    """
    return x @ dequantize(packed, scale, out_features, in_features, group, x.dtype).T


def _linear(x: torch.Tensor, w: DeviceInt4) -> torch.Tensor:
    return int4_linear(x, w.packed, w.scale, w.out_features, w.in_features, w.in_features // w.scale.shape[1])


def int4_expert(x: torch.Tensor, gate: DeviceInt4, up: DeviceInt4, down: DeviceInt4) -> torch.Tensor:
    """One routed expert, SwiGLU: x [T, D] -> down(silu(gate x) * up x) [T, D], in x's dtype."""
    return _linear(F.silu(_linear(x, gate)) * _linear(x, up), down)


def cold_pairs(ids: torch.Tensor, hot: dict[int, ExpertWeights] | list[int]) -> torch.Tensor:
    """ids [T, K] -> bool [T, K] on ids' device: True where the pair's expert is not hot (CPU work).
    Cheap and host-side: call it first, submit the CPU's share, then launch hot_expert_moe."""
    ids_host = ids.cpu()
    return (~torch.isin(ids_host, torch.tensor(sorted(hot), dtype=ids_host.dtype))).to(ids.device)


def hot_expert_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   hot: dict[int, ExpertWeights]) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed pairs whose expert is hot, on hot's device -> (y_hot fp32 [T, D], cold_mask bool [T, K]).

    x [T, D], ids [T, K], weights [T, K] (any device). y_hot[t] = sum over hot pairs of
    weights[t, k] * Expert_ids[t, k](x[t]), accumulated in fp32. cold_mask marks the pairs left for
    the CPU: give the CPU backend weights * cold_mask (a zero weight drops the pair), then
    y_hot + y_cpu equals the whole routed sum up to fp32 rounding of the final addition.
    Reads the expert ids on the host once (the CPU submit needs them anyway): not graph-capturable.
    """
    ids_host = ids.cpu()
    is_hot = ~cold_pairs(ids_host, hot)  # [T, K]
    dev = next(iter(hot.values()))[0].packed.device if hot else x.device
    xd, w32 = x.to(dev), weights.to(dev, torch.float32)
    y = torch.zeros(x.shape, device=dev, dtype=torch.float32)
    for e in torch.unique(ids_host[is_hot]).tolist():
        tok, slot = torch.nonzero(ids_host == e, as_tuple=True)
        tok_d, slot_d = tok.to(dev), slot.to(dev)
        ye = int4_expert(xd[tok_d], *hot[e]).float()  # [n, D]
        y.index_add_(0, tok_d, ye * w32[tok_d, slot_d, None])
    return y, (~is_hot).to(ids.device)

