"""Hot experts: the most-routed experts of each MoE layer, kept and computed on the GPU side.

Owns HotSlots (one layer's hot experts in fixed device buffers, changed in place so a captured CUDA
graph keeps reading the same addresses; the device-side expert -> slot map), HotExperts (every
layer's hot set, chosen from the routing counts, and the split of a layer call into hot and cold
pairs), the torch fixed-shape sum (hot_moe_by_slot) and the one rule for the fused Triton kernel.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kernels_gpu.int4 import DeviceInt4, as_bf16, cold_pairs, dequantize, hot_expert_moe

from hybrid.checkpoint.reader import Checkpoint
from hybrid.experts.backend import HotSet

PARTS = ("gate", "up", "down")  # an expert's projections, in ExpertWeights order
FUSED_HOT_TOKENS = 4  # at most, tokens per call the fused hot-expert kernel takes (a GEMV per pair)


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
        self._is_hot = np.zeros(n_experts, dtype=bool)  # the same on the host, indexable by an id array
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

    def cold(self, ids: np.ndarray) -> np.ndarray:
        """ids int [T, K] (host) -> bool [T, K]: True where the pair's expert is not hot (the CPU's share).
        kernels_gpu.int4.cold_pairs for a HotSlots, without a sort and a tensor per call (the decode hop)."""
        return ~self._is_hot[ids]

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
        self._is_hot[expert] = True
        self.slot_of[expert] = s

    def drop(self, expert: int) -> None:
        s = self._slot.pop(expert)
        self._is_hot[expert] = False
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


def fused_kernel(want: bool | None, cuda: bool) -> Callable | None:
    """kernels_gpu.int4_triton.fused_hot_moe, called as hot_moe_by_slot is, when it should compute hot
    experts, else None.

    want: None (on CUDA, when Triton imports), True (always; Triton's interpreter without CUDA; an
    error if Triton does not import), False (never). The one rule for the scheduler and the decode step."""
    if want is False or (want is None and not cuda):
        return None
    fn = _triton_kernel()
    if fn is None and want:
        raise RuntimeError("fused hot experts were asked for but Triton does not import; "
                           "pip install triton, or leave fused_hot at None")
    return fn


@functools.lru_cache(maxsize=1)
def _triton_kernel() -> Callable | None:  # imported once: a failed import is not retried per layer
    try:
        from kernels_gpu.int4_triton import fused_hot_moe
    except ImportError:
        return None

    def fused_hot_moe_by_slot(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                              slots: HotSlots) -> torch.Tensor:  # hot_moe_by_slot's call; the kernel takes tensors
        return fused_hot_moe(x, ids, weights, slots.slot_of, slots.packed, slots.scale)

    return fused_hot_moe_by_slot


class HotExperts:
    """Every MoE layer's hot set, and the GPU side's share of a layer call.

    capacity: hot experts per layer (0: none; each layer's set is then an empty dict until set()).
    Each layer gets one HotSlots, made here and never replaced by refresh(), so a captured decode
    step stays valid as the hot experts change. counts: layer -> int64 [E] routing counts, read
    (live) by refresh(). fused: hybrid.experts.hot.fused_kernel's switch for decode's hot pairs.
    """

    def __init__(self, ckpt: Checkpoint, capacity: int, device: torch.device | str,
                 counts: Mapping[int, np.ndarray], fused: bool | None = None):
        cfg = ckpt.config
        self.ckpt, self.capacity, self.counts, self.fused = ckpt, capacity, counts, fused
        group = cfg.quant.group_size if cfg.quant else 32
        self._own: dict[int, HotSlots] = {layer: HotSlots(capacity, cfg.n_routed_experts, cfg.hidden_size,
                                                          cfg.moe_intermediate_size, group, device)
                                          for layer in cfg.moe_layers} if capacity else {}
        self._sets: dict[int, HotSet] = {layer: self._own.get(layer, {}) for layer in cfg.moe_layers}
        self.sets: Mapping[int, HotSet] = MappingProxyType(self._sets)  # read-only view, always current
        self.reset_stats()

    def reset_stats(self) -> None:
        self.hot_pairs = 0  # (token, expert) pairs computed by hot experts
        self.hot_s = 0.0

    def set(self, layer: int, hot: HotSet) -> None:
        """Replace layer's hot set: a HotSlots (the decode graph reads it on the device) or a plain
        {expert: (gate, up, down) DeviceInt4} dict."""
        self._sets[layer] = hot

    def refresh(self) -> None:
        """Make each layer's hot set its `capacity` most-routed experts so far (uploading only changes)."""
        if not self.capacity:
            return
        for layer, slots in self._own.items():
            if self._sets[layer] is not slots:  # set() replaced it: back to the layer's own buffers, emptied
                slots.keep_only([])
                self._sets[layer] = slots
        for layer, counts in self.counts.items():
            if not counts.any():
                continue
            want = [int(e) for e in np.argsort(-counts, kind="stable")[: self.capacity] if counts[e] > 0]
            slots = self._own[layer]
            for e in slots.keep_only(want):
                ws = [self.ckpt.expert(layer, e, p) for p in ("gate_proj", "up_proj", "down_proj")]
                slots.put(e, [DeviceInt4.from_arrays(w.packed, w.scale, w.shape) for w in ws])

    def split(self, layer: int, idn: np.ndarray, wn: np.ndarray, device_hot: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """-> (the CPU's weights fp32 [T, K], zero on hot pairs; cold bool [T, K] or None without a
        hot set). device_hot: the caller computes the hot pairs from HotSlots on the device."""
        hot = self._sets.get(layer)
        if device_hot and hot and not isinstance(hot, HotSlots):
            raise ValueError(f"layer {layer}: device_hot needs its hot experts in a HotSlots (the caller computes "
                             "them from its slots), not a plain dict")
        if not hot:
            return wn, None
        cold = hot.cold(idn) if isinstance(hot, HotSlots) else cold_pairs(torch.from_numpy(idn), hot).numpy()
        if device_hot:
            self.hot_pairs += int((~cold).sum())
        return np.where(cold, wn, 0.0).astype(np.float32), cold  # a zero weight drops a pair from the CPU's work

    def compute(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, idn: np.ndarray,
                cold: np.ndarray) -> torch.Tensor:
        """The hot pairs' sum y_hot fp32 [T, D] on x's device (split() gave `cold` for this call)."""
        hot = self._sets[layer]
        t0 = time.perf_counter()
        fused = fused_kernel(self.fused, x.device.type == "cuda") \
            if isinstance(hot, HotSlots) and x.shape[0] <= FUSED_HOT_TOKENS else None
        if fused is not None:  # the ids are read on the device: no host round trip, no per-expert loop
            y_hot = fused(x, ids.to(x.device), weights, hot)
            self.hot_pairs += int((~cold).sum())
        else:
            y_hot, cold_mask = hot_expert_moe(x, torch.from_numpy(idn), weights, hot)
            self.hot_pairs += int((~cold_mask).sum())
        self.hot_s += time.perf_counter() - t0
        return y_hot
