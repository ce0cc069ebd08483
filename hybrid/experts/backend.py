"""ExpertBackend: everything the model, the engine and the decode step may ask of the routed experts.

Owns the one interface a backend implements, with the defaults of a backend that lacks a feature
(no host hops, no prefetch, no hot experts, no routing counts, no cache). Callers use these members
and never probe a backend for others. No implementation here: reference.py, scheduler.py, or a
backend of your own (experts on other machines) subclass it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Callable

import numpy as np
import torch

from kernels_gpu.int4 import DeviceInt4

Handle = Any  # what submit returns and wait takes; opaque to callers
Predict = Callable[[int, torch.Tensor, int], torch.Tensor]  # (layer, x [T, D], width) -> candidate ids [T, width]
# one layer's hot experts: {expert: (gate, up, down)}; a hybrid.experts.hot.HotSlots, or a plain dict
HotSet = Mapping[int, tuple[DeviceInt4, DeviceInt4, DeviceInt4]]
NO_LAYERS: Mapping = MappingProxyType({})  # the read-only empty mapping the defaults hand out


class ExpertBackend(ABC):
    """Routed experts of one MoE layer: y[T, D] = sum_k weights[t, k] * Expert_ids[t, k](x[t]).

    A subclass implements submit and wait; every other member has a default that is right for a
    backend without that feature. Statistics the engine reports come from stats() alone.
    """

    # ---- the seam: the model's one call ------------------------------------------------------
    @abstractmethod
    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Handle:
        """Start layer's routed sum: x [T, D], ids int [T, K], weights fp32 [T, K] (a 0 drops a pair)."""

    @abstractmethod
    def wait(self, handle: Handle) -> torch.Tensor:
        """The routed sum submit started: y fp32 [T, D] on x's device."""

    def close(self) -> None:
        """Release threads, files and device buffers; the backend is unusable afterwards."""

    # ---- the host-side hop (hybrid.runtime.decode_step) --------------------------------------
    @property
    def host_hops(self) -> bool:
        """True: submit_host / wait_host touch no device with device_hot=True, so they may run inside
        a CUDA host function (the one-graph-per-token step needs this)."""
        return False

    def submit_host(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    xn: np.ndarray, idn: np.ndarray, wn: np.ndarray, device_hot: bool = False,
                    predicted: np.ndarray | None = None) -> Handle:
        """submit() given host copies too: xn fp32 [T, D], idn int64 [T, K], wn fp32 [T, K].

        device_hot: the caller computes the pairs of `hot[layer]` itself (only with host_hops).
        predicted: the next MoE layer's candidate experts [prefetch_width], computed by the caller."""
        if device_hot:
            raise ValueError(f"{type(self).__name__} has no host hops: device_hot needs host_hops")
        return self.submit(layer, x, ids, weights)

    def wait_host(self, handle: Handle, out: np.ndarray) -> torch.Tensor | None:
        """wait(), split: the host's share written into `out` (fp32 [T, D]) and the device's share
        returned (fp32 on the device; None when the device computed nothing). By default all of
        the sum is the device's."""
        y = self.wait(handle)
        out.fill(0.0)
        return y

    # ---- a CPU decode step in one call (hybrid.model.cpu_step) -------------------------------
    def decode_table(self, layer: int, tokens: int) -> tuple[Any, int, np.ndarray] | None:
        """(layer's kernels_cpu.table.ExpertTable, threads, counts) where submit and wait for `tokens`
        tokens on the CPU would do nothing but kernels_cpu.moe.moe_forward over that table, on the
        caller's thread with that many threads, and count the routing: the caller may then run the same
        kernel inside its own Numba call, adding one to counts (int64 [E], route_counts[layer]) for each
        (token, expert) pair of non-zero weight, and must report the call with record_decode. None (the
        default) where the backend does more or other."""
        return None

    def record_decode(self, layer: int, tokens: int, experts: int, seconds: float) -> None:
        """Count a call that decode_table let the caller run as submit and wait would have counted it:
        `tokens` tokens, `experts` distinct experts computed, `seconds` of kernel time."""
        raise NotImplementedError(f"{type(self).__name__} hands out no decode tables")

    @property
    def mapped_tables(self) -> Mapping[int, Any] | None:
        """MoE layer -> kernels_cpu.table.ExpertTable of every routed expert where it stays for the run (the
        checkpoint's maps), for reading them in place (bench's in-place RAM figure); None (the default)
        where they are not all on this machine's CPU side at fixed places (a RAM cache's slots move)."""
        return None

    # ---- prefetch: the next layer's router guesses what to load ------------------------------
    @property
    def prefetch_width(self) -> int:
        """Candidates per prediction; 0 when the backend does not prefetch (then predict is unused)."""
        return 0

    @property
    def next_layer(self) -> Mapping[int, int]:
        """MoE layer -> the MoE layer after it (the last has none)."""
        return NO_LAYERS

    def predict(self, layer: int, x: torch.Tensor, width: int) -> torch.Tensor:
        """layer's router applied to x [T, D] (the previous layer's input) -> candidate ids [T, width],
        on x's device. Only asked when prefetch_width > 0."""
        raise NotImplementedError(f"{type(self).__name__} does not prefetch (prefetch_width is 0)")

    # ---- hot experts: computed on the GPU side from INT4 buffers -----------------------------
    @property
    def hot(self) -> Mapping[int, HotSet]:
        """MoE layer -> its hot experts now (a HotSlots, or a plain dict); no entry, or an empty
        one, where every pair goes to the backend's own workers."""
        return NO_LAYERS

    @property
    def hot_capacity(self) -> int:
        """Hot experts per MoE layer the backend keeps (its HotSlots' capacity); 0: none."""
        return 0

    @property
    def fused_hot(self) -> bool | None:
        """Whether decode's hot pairs go through the fused Triton kernel: None (on CUDA when Triton
        imports), True, False; the switch hybrid.experts.hot.fused_kernel reads."""
        return None

    def set_hot(self, layer: int, hot: HotSet) -> None:
        """Replace layer's hot set (a HotSlots, or a plain {expert: (gate, up, down)} dict)."""
        raise ValueError(f"{type(self).__name__} keeps no hot experts (hot_capacity is 0)")

    def refresh_hot(self) -> None:
        """Make each layer's hot set the most-routed experts so far (uploading only changes)."""

    # ---- routing counts ----------------------------------------------------------------------
    @property
    def route_counts(self) -> Mapping[int, np.ndarray]:
        """MoE layer -> int64 [E]: how often each expert was routed to (what chooses hot experts)."""
        return NO_LAYERS

    # ---- statistics --------------------------------------------------------------------------
    def stats(self) -> dict:
        """Since reset_stats(), as Engine.stats() reports them: experts_compute_s (CPU kernel time),
        io_wait_s (kernels waiting for reads), expert_bytes (expert bytes the kernels read), io_s
        and bytes_read (the RAM cache's reads; in mmap mode what the process read from storage, page
        faults on the shard maps that the page cache did not hold) and cache (its hit/prefetch summary,
        or None)."""
        return {"experts_compute_s": 0.0, "io_wait_s": 0.0, "expert_bytes": 0, "io_s": 0.0, "bytes_read": 0,
                "cache": None}

    def reset_stats(self) -> None:
        """Zero what stats() reports (and the backend's own counters, the cache's included)."""
