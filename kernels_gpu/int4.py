"""Dequantising INT4 linear layers and the hot-expert half of a MoE layer, in torch on any device.

Owns computing routed experts that sit on the GPU ("hot") from the checkpoint's own packed layout
(no repacking), and the exact split of a layer's (token, slot) pairs between those and the CPU.
Functions on tensors, and HotSlots, a layer's hot experts stacked in fixed device buffers; imports
nothing from hybrid/. No Triton here: the fused decode kernel is kernels_gpu.int4_triton, imported
lazily, and tested against these functions.
Layout: packed int32 [O, I/8], column 8j+k in bits 4k..4k+3 of word j as q + 8; scale bf16 [O, I/G].
Letters: T tokens, K slots (experts per token), D hidden, F expert intermediate, O out, I in, G group.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator, NamedTuple, Sequence

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


PARTS = ("gate", "up", "down")


class HotSlots(Mapping):
    """One MoE layer's hot experts, stacked in device buffers of fixed capacity: {expert: ExpertWeights}.

    The buffers never move: an expert is placed into a free slot (copied in place) and leaves by
    freeing its slot, so a CUDA graph captured over them stays valid as the hot set changes between
    tokens. slot_of (int32 [E] on the device, -1 where not hot) lets a kernel find an expert's slot
    from device-side expert ids, without the host. As a Mapping it is what hot_expert_moe and
    cold_pairs take: each value is three DeviceInt4 views into the stacks.
    """

    def __init__(self, capacity: int, n_experts: int, hidden: int, inter: int, group: int = 32,
                 device: torch.device | str = "cpu"):
        if capacity < 1 or hidden % group or inter % group or group % 8:
            raise ValueError(f"HotSlots needs capacity >= 1 and hidden {hidden} / inter {inter} multiples of "
                             f"the group {group} (itself a multiple of 8)")
        self.capacity, self.n_experts, self.hidden, self.inter, self.group = capacity, n_experts, hidden, inter, group
        self.device = torch.device(device)
        H, D, F_, G = capacity, hidden, inter, group
        dims = {"gate": (F_, D), "up": (F_, D), "down": (D, F_)}  # [out, in]
        self.packed = {p: torch.zeros(H, o, i // 8, dtype=torch.int32, device=self.device) for p, (o, i) in dims.items()}
        self.scale = {p: torch.zeros(H, o, i // G, dtype=torch.bfloat16, device=self.device) for p, (o, i) in dims.items()}
        self.dims = dims
        self.slot_of = torch.full((n_experts,), -1, dtype=torch.int32, device=self.device)
        self._slot: dict[int, int] = {}  # expert -> slot, the host's copy of slot_of
        self._free = list(range(H - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.packed, self.scale) for t in d.values())

    # ---- Mapping ----------------------------------------------------------------------------
    def __getitem__(self, expert: int) -> tuple[DeviceInt4, DeviceInt4, DeviceInt4]:
        s = self._slot[expert]
        return tuple(DeviceInt4(self.packed[p][s], self.scale[p][s], *self.dims[p]) for p in PARTS)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._slot))

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, expert: object) -> bool:  # host-only (Mapping's default would build device views)
        return expert in self._slot

    # ---- changes ----------------------------------------------------------------------------
    def put(self, expert: int, weights: Sequence[DeviceInt4]) -> None:
        """Place `expert` (gate, up, down on any device; copied in) into a free slot, or over its own."""
        if not 0 <= expert < self.n_experts:
            raise ValueError(f"expert {expert} is outside the layer's {self.n_experts} experts")
        s = self._slot.get(expert)
        if s is None:
            if not self._free:
                raise ValueError(f"all {self.capacity} hot slots are taken; drop an expert first")
            s = self._free.pop()
        for p, w in zip(PARTS, weights):
            o, i = self.dims[p]
            if (w.out_features, w.in_features) != (o, i) or tuple(w.scale.shape) != (o, i // self.group):
                raise ValueError(f"hot expert {expert} {p}: [{w.out_features}, {w.in_features}] scale "
                                 f"{tuple(w.scale.shape)} does not fit the slots' [{o}, {i}] group {self.group}")
            self.packed[p][s].copy_(w.packed.view(torch.int32), non_blocking=True)
            self.scale[p][s].copy_(as_bf16(w.scale), non_blocking=True)
        self._slot[expert] = s
        self.slot_of[expert] = s

    def drop(self, expert: int) -> None:
        s = self._slot.pop(expert)
        self.slot_of[expert] = -1
        self._free.append(s)

    def keep_only(self, experts: Sequence[int]) -> list[int]:
        """Drop every hot expert not in `experts`; -> those of `experts` still to put()."""
        want = set(experts)
        for e in [e for e in self._slot if e not in want]:
            self.drop(e)
        return [e for e in experts if e not in self._slot]


def hot_moe_by_slot(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, slots: HotSlots) -> torch.Tensor:
    """hot_expert_moe's y_hot with the expert ids read on the device (slot_of), in fixed shapes.

    x [T, D], ids [T, K], weights [T, K] on slots' device -> y_hot fp32 [T, D]: sum over the pairs
    whose expert is hot of weights * expert(x). No host sync and no value-dependent shape, so a CUDA
    graph can hold it. It gathers and dequantises K experts' tiles per token (cold pairs read slot 0
    and are masked), which is slow: on CUDA with Triton, kernels_gpu.int4_triton.fused_hot_moe is
    the same sum reading only the hot pairs' weights, once.
    """
    T, K = ids.shape
    s = slots.slot_of[ids.reshape(-1)].long()  # [T*K]
    live = (s >= 0).float() * weights.reshape(-1).float()
    s = s.clamp(min=0)
    xf = x.float().repeat_interleave(K, dim=0)[:, None, :]  # [T*K, 1, D]

    def lin(v: torch.Tensor, p: str) -> torch.Tensor:  # v [T*K, 1, in] -> [T*K, 1, out]
        o, i = slots.dims[p]
        packed, scale = slots.packed[p][s], slots.scale[p][s]  # [T*K, o, i/8], [T*K, o, i/G]
        w = dequantize(packed.reshape(-1, i // 8), scale.reshape(-1, i // slots.group), packed.shape[0] * o, i,
                       slots.group).view(-1, o, i)
        return v @ w.transpose(1, 2)

    h = F.silu(lin(xf, "gate")) * lin(xf, "up")
    y = lin(h, "down")[:, 0, :] * live[:, None]  # [T*K, D]
    return y.view(T, K, -1).sum(1)
