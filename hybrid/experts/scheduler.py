"""Scheduler: the Numba expert backend, composing the pieces that each own one job.

Owns the order of one MoE layer call: record the routing (routing_log), keep the hot pairs for the
GPU side (hot.HotExperts), send a long prompt's layer to the GPU side (upload.PromptUpload) or the
rest to the CPU worker (cpu.CpuExperts), then guess and load the next layer's experts
(prefetch.Prefetcher). It computes nothing and moves no bytes itself; build.py assembles it.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from hybrid.experts.backend import ExpertBackend, Handle, HotSet, Predict
from hybrid.experts.cache import ExpertCache
from hybrid.experts.cpu import CpuExperts
from hybrid.experts.hot import HotExperts
from hybrid.experts.prefetch import Prefetcher
from hybrid.experts.routing_log import RoutingLog
from hybrid.experts.upload import PromptUpload


def process_read_bytes() -> int:
    """Bytes this process (all its threads) has caused to be read from storage, page faults on file maps
    included (Linux's /proc/self/io read_bytes); 0 where the OS does not say."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Scheduler(ExpertBackend):
    """cpu, hot and routing are required; prefetcher (cache mode with prefetch) and upload (long-prompt
    upload) are optional. predict: the model's router for the prefetch guess (with a prefetcher)."""

    def __init__(self, moe_layers: list[int], cpu: CpuExperts, hot: HotExperts, routing: RoutingLog,
                 prefetcher: Prefetcher | None = None, upload: PromptUpload | None = None,
                 predict: Predict | None = None):
        if prefetcher is not None and predict is None:
            raise ValueError("prefetch needs the router that predicts the next layer's experts (predict)")
        self.cpu, self.hot_experts, self.routing = cpu, hot, routing
        self.prefetcher, self.upload = prefetcher, upload
        self._next_layer = dict(zip(moe_layers, moe_layers[1:]))
        if predict is not None:  # the model's router (the interface's predict); without prefetch, its refusal
            self.predict = predict
        self.reset_stats()

    # ---- the seam ---------------------------------------------------------------------------
    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Handle:
        xn = np.ascontiguousarray(x.detach().float().cpu().numpy())
        idn = ids.cpu().numpy().astype(np.int64)
        wn = np.ascontiguousarray(weights.detach().float().cpu().numpy())
        return self.submit_host(layer, x, ids, weights, xn, idn, wn)

    def submit_host(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    xn: np.ndarray, idn: np.ndarray, wn: np.ndarray, device_hot: bool = False,
                    predicted: np.ndarray | None = None) -> Handle:
        """submit() given host copies too: xn fp32 [T, D], idn int64 [T, K], wn fp32 [T, K], C-contiguous
        (the static decode step fills pinned buffers inside its graph, so nothing here syncs the device).
        The CPU kernels read xn while they run: leave it alone until wait().

        device_hot: the caller computes the hot pairs itself (the whole-token decode graph, with
        HotSlots on the device): only the cold pairs are submitted, and nothing here touches the
        device (x, ids and weights give only their shape), so this may run in a CUDA host function.
        predicted: the next layer's candidate experts [width], computed by the caller (then
        self.predict is not called)."""
        pf = self.prefetcher
        self.routing.record(layer, idn, wn, pf.take_predicted(layer) if pf is not None else None)
        wn, cold = self.hot_experts.split(layer, idn, wn, device_hot)
        used = sorted(set(idn[wn != 0].tolist()))
        y_gpu = None
        if self.upload is not None and self.upload.wants(x.shape[0], len(used)):
            fut = self.cpu.done_zeros(xn)  # a long prompt: this layer's cold experts go to the GPU side too
            y_gpu = self.upload.compute(layer, x, ids, weights, used)
        else:
            fut = self.cpu.submit(layer, xn, idn, wn, used)
            if pf is not None:  # the guess for the next layer runs the router on x's device: not in a host function
                pf.after(layer, x, predicted, None if device_hot else self.predict, self.hot)
        if cold is not None and not device_hot:  # while the CPU works: the hot experts on the GPU side
            y_hot = self.hot_experts.compute(layer, x, ids, weights, idn, cold)
            y_gpu = y_hot if y_gpu is None else y_gpu + y_hot
        return fut, y_gpu, x.device

    def wait(self, handle: Handle) -> torch.Tensor:
        """-> y [T, D] fp32 on the GPU side's device: the CPU's share plus what the GPU side computed."""
        fut, y_gpu, device = handle
        t0 = time.perf_counter()
        y = torch.from_numpy(fut.result()).to(device, non_blocking=True)
        self.wait_s += time.perf_counter() - t0
        return y if y_gpu is None else y_gpu + y

    def wait_host(self, handle: Handle, out: np.ndarray) -> torch.Tensor | None:
        """wait(), split: the CPU's share written into `out` (fp32 [T, D], e.g. a pinned buffer the
        static decode step copies to the device itself), and what the GPU side computed returned
        (fp32 on its device; None when it computed nothing)."""
        fut, y_gpu, _ = handle
        t0 = time.perf_counter()
        np.copyto(out, fut.result())
        self.wait_s += time.perf_counter() - t0
        return y_gpu

    def decode_table(self, layer: int, tokens: int) -> tuple[Any, int, np.ndarray] | None:
        """The CPU worker's table where nothing else takes part: no prefetch, no hot set for the layer,
        no long-prompt upload that could take the call, no routing trace to write."""
        if self.prefetcher is not None or self.hot_experts.sets.get(layer) or self.routing.trace is not None \
                or (self.upload is not None and tokens > 1) or (got := self.cpu.decode_table(layer)) is None:
            return None
        return (*got, self.routing.counts[layer])

    @property
    def mapped_tables(self) -> Mapping[int, Any] | None:
        return self.cpu.tables if self.cpu.cache is None else None

    def record_decode(self, layer: int, tokens: int, experts: int, seconds: float) -> None:
        self.routing.counted(layer, tokens)
        self.cpu.count(layer, tokens, experts, seconds)

    def close(self) -> None:
        self.cpu.close()  # the worker first: it reads the cache's slots
        if self.cache is not None:
            self.cache.close()
        self.routing.close()

    # ---- the interface's features -----------------------------------------------------------
    @property
    def host_hops(self) -> bool:
        return True

    @property
    def prefetch_width(self) -> int:
        return self.prefetcher.width if self.prefetcher is not None else 0

    @property
    def next_layer(self) -> Mapping[int, int]:
        return self._next_layer

    @property
    def hot(self) -> Mapping[int, HotSet]:
        return self.hot_experts.sets

    @property
    def hot_capacity(self) -> int:
        return self.hot_experts.capacity

    @property
    def fused_hot(self) -> bool | None:
        return self.hot_experts.fused

    @fused_hot.setter
    def fused_hot(self, want: bool | None) -> None:
        self.hot_experts.fused = want

    def set_hot(self, layer: int, hot: HotSet) -> None:
        self.hot_experts.set(layer, hot)

    def refresh_hot(self) -> None:
        self.hot_experts.refresh()

    @property
    def route_counts(self) -> Mapping[int, np.ndarray]:
        return self.routing.counts

    # ---- statistics -------------------------------------------------------------------------
    @property
    def cache(self) -> ExpertCache | None:
        """The RAM expert cache (cache mode), or None (mmap mode)."""
        return self.cpu.cache

    @property
    def compute_s(self) -> float:
        return self.cpu.compute_s

    @property
    def cpu_prefill_tokens(self) -> int:
        return self.cpu.prefill_tokens

    @property
    def cpu_prefill_s(self) -> float:
        return self.cpu.prefill_s

    @property
    def hot_pairs(self) -> int:
        return self.hot_experts.hot_pairs

    @property
    def uploaded_layers(self) -> int:
        return self.upload.uploaded_layers if self.upload is not None else 0

    def stats(self) -> dict:
        cpu, cache = self.cpu, self.cache
        out = {"experts_compute_s": cpu.compute_s, "io_wait_s": cpu.io_wait_s, "expert_bytes": cpu.expert_bytes,
               "io_s": 0.0, "bytes_read": 0, "cache": None}
        if cache is None:  # mmap mode: the experts' bytes the page cache did not hold, read by the faults
            out["bytes_read"] = process_read_bytes() - self._read0
        else:
            st = cache.stats.values()
            hits, misses = sum(s.hits for s in st), sum(s.misses for s in st)
            out["io_s"] = sum(s.io_s for s in st)
            out["bytes_read"] = sum(s.bytes_read for s in st)
            out["cache"] = {
                "slots": cache.n_slots, "hits": hits, "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
                "prefetched": sum(s.prefetched for s in st), "prefetch_used": sum(s.prefetch_used for s in st),
                "per_layer": {l: vars(s).copy() for l, s in cache.stats.items()},
            }
        return out

    def reset_stats(self) -> None:
        self.wait_s = 0.0  # time wait() blocked on the CPU worker
        self._read0 = process_read_bytes()  # mmap mode's disk reads count from here (stats)
        self.cpu.reset_stats()
        self.hot_experts.reset_stats()
        if self.cache is not None:
            self.cache.reset_stats()
