"""Per-layer scheduling of the routed experts: the expert backend the model calls (submit / wait).

Owns the order of work for one MoE layer: experts already in RAM run first on the CPU worker while
misses load; loads start in waves when the cache is smaller than the layer's working set; the next
layer's experts are prefetched (its router applied to this layer's input, a candidate set wider
than top-k, at low IO priority, never evicting what this layer pinned). Also routing traces and
timing counters. The kernels compute; expert_cache moves bytes; this file only orders them.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Callable, TextIO

import numba
import numpy as np
import torch

from kernels_cpu.moe import moe_forward
from kernels_cpu.table import ExpertTable
from hybrid.experts.hot import HotSlots, fused_kernel
from kernels_gpu.int4 import DeviceInt4, as_bf16, cold_pairs, hot_expert_moe
from hybrid.experts.upload import LayerUploader

from hybrid.experts.cache import DEMAND, PREFETCH, ExpertCache

PREFETCH_MIN_USE = 0.3  # adaptive prefetch keeps going while at least this share of its loads gets used
PREFETCH_WINDOW = 64  # prefetches per judgement
PREFETCH_SAMPLE = 32  # while off, prefetch on one layer call in this many
FUSED_HOT_TOKENS = 4  # at most, tokens per call the fused hot-expert kernel takes (a GEMV per pair)
UPLOAD_GROUP = 16  # at most, experts per upload for a long prompt (K2: 0.4 GB; x2 pinned and x2 on the GPU)
Fetch = Callable[[int, int], list[np.ndarray]]  # (layer, expert) -> 6 arrays in PARTS order, on-disk layout
Offload = Callable[[int, int], bool]  # (prompt tokens, experts touched) -> run this layer on the GPU side?
Predict = Callable[[int, torch.Tensor, int], torch.Tensor]  # (layer, x [T, D], width) -> candidate ids [T, width]


class Scheduler:
    def __init__(self, moe_layers: list[int], tables: dict[int, ExpertTable] | None = None,
                 cache: ExpertCache | None = None, predict: Predict | None = None, prefetch_width: int = 0,
                 trace: TextIO | None = None, threads: int | None = None, adaptive_prefetch: bool = True):
        if (tables is None) == (cache is None):
            raise ValueError("Scheduler needs either mmap tables or a cache")
        self.cache = cache
        self.tables = cache.tables if cache else tables
        self.next_layer = dict(zip(moe_layers, moe_layers[1:]))
        self.first_layer = moe_layers[0] if moe_layers else -1
        self.predict = predict  # the engine supplies the model's router when None
        self.prefetch = cache is not None and prefetch_width > 0
        self.prefetch_width = prefetch_width
        self.adaptive_prefetch = adaptive_prefetch
        self._layer_calls = 0
        self._pf_on, self._pf_mark = True, (0, 0)  # adaptive prefetch: on, and where its window began
        # long prompts: upload the layer's experts to the GPU side instead (set by the engine)
        self.offload: Offload | None = None
        self.fetch: Fetch | None = None
        self._uploader: LayerUploader | None = None
        self.upload_group = UPLOAD_GROUP  # the engine lowers it to what the plan's spare VRAM holds
        self.uploaded_layers = 0
        self.trace = trace
        self._predicted: dict[int, list[int]] = {}
        # hot experts live on the GPU side (kernels_gpu.int4); the rest of the layer's pairs go to the CPU
        self.hot: dict[int, dict | HotSlots] = {layer: {} for layer in moe_layers}
        # decode's hot experts through kernels_gpu.int4_triton (None: when on CUDA and Triton imports)
        self.fused_hot: bool | None = None
        self.route_counts: dict[int, np.ndarray] = {}  # layer -> [E] how often each expert was routed to
        self._token = 0
        # numba's thread count is per calling thread: set it on the worker that runs the kernels
        init = (lambda: numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))) if threads else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experts", initializer=init)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.compute_s = self.io_wait_s = self.wait_s = self.hot_s = 0.0
        self.expert_bytes = 0  # expert bytes the kernels read (unique experts per call)
        self.hot_pairs = 0  # (token, expert) pairs computed by hot experts
        self.cpu_prefill_tokens = 0  # token-layers of multi-token calls the CPU computed, and their time:
        self.cpu_prefill_s = 0.0  # the CPU's prefill rate, for the long-prompt upload decision

    # ---- the seam ---------------------------------------------------------------------------
    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        xn = np.ascontiguousarray(x.detach().float().cpu().numpy())
        idn = ids.cpu().numpy().astype(np.int64)
        wn = np.ascontiguousarray(weights.detach().float().cpu().numpy())
        return self.submit_host(layer, x, ids, weights, xn, idn, wn)

    def submit_host(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    xn: np.ndarray, idn: np.ndarray, wn: np.ndarray, device_hot: bool = False,
                    predicted: np.ndarray | None = None):
        """submit() given host copies too: xn fp32 [T, D], idn int64 [T, K], wn fp32 [T, K], C-contiguous
        (the static decode step fills pinned buffers inside its graph, so nothing here syncs the device).
        The CPU kernels read xn while they run: leave it alone until wait().

        device_hot: the caller computes the hot pairs itself (the whole-token decode graph, with
        HotSlots on the device): only the cold pairs are submitted, and nothing here touches the
        device (x, ids and weights give only their shape), so this may run in a CUDA host function.
        predicted: the next layer's candidate experts [width], computed by the caller (then
        self.predict is not called)."""
        hot = self.hot.get(layer)
        if device_hot and hot and not isinstance(hot, HotSlots):
            raise ValueError(f"layer {layer}: device_hot needs its hot experts in a HotSlots (the caller computes "
                             "them from its slots), not a plain dict")
        self._record(layer, idn, wn)
        if hot:  # the CPU gets only the cold pairs; a zero weight drops a pair from its work
            cold = hot.cold(idn) if isinstance(hot, HotSlots) else cold_pairs(torch.from_numpy(idn), hot).numpy()
            wn = np.where(cold, wn, 0.0).astype(np.float32)
        used = sorted(set(idn[wn != 0].tolist()))
        y_gpu = None
        if self.offload is not None and x.shape[0] > 1 and self.offload(x.shape[0], len(used)):
            fut = self._done_zeros(xn)  # a long prompt: this layer's cold experts go to the GPU side too
            y_gpu = self._upload_and_compute(layer, x, ids, weights, used)
        else:
            fut = self._submit_cpu(layer, x, xn, idn, wn, used, predicted, host_only=device_hot)
        if device_hot:
            self.hot_pairs += int((~cold).sum()) if hot else 0
        elif hot:  # while the CPU works: the hot experts on the GPU side
            t0 = time.perf_counter()
            fused = fused_kernel(self.fused_hot, x.device.type == "cuda") \
                if isinstance(hot, HotSlots) and x.shape[0] <= FUSED_HOT_TOKENS else None
            if fused is not None:  # the ids are read on the device: no host round trip, no per-expert loop
                y_hot = fused(x, ids.to(x.device), weights, hot)
                self.hot_pairs += int((~cold).sum())
            else:
                y_hot, cold_mask = hot_expert_moe(x, torch.from_numpy(idn), weights, hot)
                self.hot_pairs += int((~cold_mask).sum())
            self.hot_s += time.perf_counter() - t0
            y_gpu = y_hot if y_gpu is None else y_gpu + y_hot
        return fut, y_gpu, x.device

    @staticmethod
    def _done_zeros(xn: np.ndarray) -> Future:
        fut: Future = Future()
        fut.set_result(np.zeros_like(xn))
        return fut

    def _upload_and_compute(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                            used: list[int]) -> torch.Tensor:
        """A long prompt: stream the layer's used experts to the GPU side in double-buffered groups and
        run the whole routed sum there (exact: the sum splits over groups)."""
        table = self.tables[layer]
        if self._uploader is None:
            n = self.upload_group
            self._uploader = LayerUploader(n * int(table.expert_nbytes) + 64 * 6 * n, x.device)
        D, I = table.hidden, table.inter
        shapes = ((I, D), (I, D), (D, I))
        groups = [used[i:i + self.upload_group] for i in range(0, len(used), self.upload_group)]
        payloads = ([a for e in g for a in self.fetch(layer, e)] for g in groups)
        y = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        for g, arrays in zip(groups, self._uploader.stream(payloads)):
            hot = {e: tuple(DeviceInt4(arrays[6 * k + 2 * j], as_bf16(arrays[6 * k + 2 * j + 1]), *shapes[j])
                            for j in range(3)) for k, e in enumerate(g)}
            y += hot_expert_moe(x, ids, weights, hot)[0]
        self.uploaded_layers += 1
        return y

    def _submit_cpu(self, layer: int, x: torch.Tensor, xn: np.ndarray, idn: np.ndarray, wn: np.ndarray,
                    used: list[int], predicted: np.ndarray | None = None, host_only: bool = False) -> Future:
        """host_only: touch no device (a CUDA host function calls this): no prediction of our own."""
        if x.shape[0] > 1:  # the CPU's prefill rate: this layer's tokens, over its kernel calls' time
            self.cpu_prefill_tokens += x.shape[0]
        if self.cache is None:
            return self._pool.submit(self._kernel, layer, xn, idn, wn, len(used))
        # pin what is resident and start the misses before any prefetch can take their slots
        resident, missing = self.cache.pin_ready(layer, used)
        started, waiting = {}, []
        for e in missing:
            fut = self.cache.load(layer, e, DEMAND, pin=True)
            if fut is None:
                waiting.append(e)
            else:
                started[e] = fut
        fut = self._pool.submit(self._run_cached, layer, xn, idn, wn, resident, started, waiting)
        # then the guess for the next layer (its router on the device: a sync the workers need not wait for)
        guess = None if host_only else self.predict  # it runs the router on x's device
        if (self._prefetch_pays() and (guess is not None or predicted is not None) and x.shape[0] == 1
                and layer in self.next_layer):
            nxt = self.next_layer[layer]
            cand = (predicted if predicted is not None else guess(nxt, x, self.prefetch_width)[0]).tolist()
            self._predicted[nxt] = cand
            for e in cand:
                if e not in self.hot.get(nxt, {}):  # hot experts never need the RAM cache
                    self.cache.load(nxt, e, PREFETCH)
        return fut

    def _prefetch_pays(self) -> bool:
        """Prefetch while it is right often enough. On fine-grained MoE the next layer's router guesses
        poorly (research notes: ~40-50% coverage), and a wrong guess costs disk bandwidth that demand
        reads need. Adaptive mode judges each window of PREFETCH_WINDOW prefetches: under
        PREFETCH_MIN_USE of them used turns it off, at or over turns it on; while off it still
        prefetches on one layer call in PREFETCH_SAMPLE, so a later window can show guesses have improved."""
        if not self.prefetch:
            return False
        self._layer_calls += 1
        if not self.adaptive_prefetch:
            return True
        made = sum(s.prefetched for s in self.cache.stats.values())
        used = sum(s.prefetch_used for s in self.cache.stats.values())
        made0, used0 = self._pf_mark
        if made < made0:  # the statistics were reset: start a new window
            self._pf_mark = made0, used0 = made, used
        if made - made0 >= PREFETCH_WINDOW:
            self._pf_on = used - used0 >= PREFETCH_MIN_USE * (made - made0)
            self._pf_mark = (made, used)
        return self._pf_on or self._layer_calls % PREFETCH_SAMPLE == 0

    def wait(self, handle) -> torch.Tensor:
        """-> y [T, D] fp32 on the GPU side's device: the CPU's share plus what the GPU side computed."""
        fut, y_gpu, device = handle
        t0 = time.perf_counter()
        y = torch.from_numpy(fut.result()).to(device, non_blocking=True)
        self.wait_s += time.perf_counter() - t0
        return y if y_gpu is None else y_gpu + y

    def wait_host(self, handle, out: np.ndarray) -> torch.Tensor | None:
        """wait(), split: the CPU's share written into `out` (fp32 [T, D], e.g. a pinned buffer the
        static decode step copies to the device itself), and what the GPU side computed returned
        (fp32 on its device; None when it computed nothing)."""
        fut, y_gpu, _ = handle
        t0 = time.perf_counter()
        np.copyto(out, fut.result())
        self.wait_s += time.perf_counter() - t0
        return y_gpu

    def set_hot(self, layer: int, hot: dict | HotSlots) -> None:
        """Replace layer's hot set: a hybrid.experts.hot.HotSlots (what the engine keeps; the decode
        graph reads it on the device), or a plain {expert: (gate, up, down) DeviceInt4} dict."""
        self.hot[layer] = hot

    # ---- worker side --------------------------------------------------------------------------
    def _kernel(self, layer: int, x: np.ndarray, ids: np.ndarray, w: np.ndarray, n_experts: int) -> np.ndarray:
        t0 = time.perf_counter()
        y = moe_forward(x, ids, w, self.tables[layer])
        dt = time.perf_counter() - t0
        self.compute_s += dt
        if x.shape[0] > 1:  # tokens are counted once per layer call (_submit_cpu), time per kernel call
            self.cpu_prefill_s += dt
        self.expert_bytes += n_experts * self.tables[layer].expert_nbytes
        return y

    def _run_cached(self, layer: int, x: np.ndarray, ids: np.ndarray, w: np.ndarray, resident: list[int],
                    started: dict[int, Future], waiting: list[int]) -> np.ndarray:
        cache = self.cache
        out = np.zeros_like(x)
        try:
            if resident:  # resident experts run first while the misses load
                out += self._kernel(layer, x, ids, np.where(np.isin(ids, resident), w, 0).astype(np.float32), len(resident))
                cache.unpin(layer, resident)
                resident = []
            while started or waiting:
                while waiting:  # a cache smaller than the layer's working set: load in waves
                    fut = cache.load(layer, waiting[0], DEMAND, pin=True)
                    if fut is None:
                        break
                    started[waiting.pop(0)] = fut
                if not started:
                    raise RuntimeError(f"expert cache of {cache.n_slots} slots has no slot free for layer {layer}")
                t0 = time.perf_counter()
                done, _ = wait_futures(list(started.values()), return_when=FIRST_COMPLETED)
                self.io_wait_s += time.perf_counter() - t0
                group = [e for e, f in started.items() if f in done]
                for e in group:
                    del started[e]
                try:
                    for f in done:
                        f.result()  # a read error surfaces here, to the caller of wait()
                    out += self._kernel(layer, x, ids, np.where(np.isin(ids, group), w, 0).astype(np.float32), len(group))
                finally:
                    cache.unpin(layer, group)
        finally:
            cache.unpin(layer, resident)
            cache.unpin(layer, list(started))  # on error, let go of what is still loading
        return out

    # ---- traces -------------------------------------------------------------------------------
    def _record(self, layer: int, ids: np.ndarray, w: np.ndarray) -> None:
        counts = self.route_counts.get(layer)
        if counts is None:
            counts = self.route_counts[layer] = np.zeros(self.tables[layer].loc.shape[0], dtype=np.int64)
        np.add.at(counts, ids[w != 0], 1)
        if layer == self.first_layer:
            self._token += ids.shape[0]
        if self.trace is None:
            return
        rec = {"layer": layer, "token": self._token - ids.shape[0], "experts": ids.tolist(),
               "weights": np.round(w, 5).tolist(), "predicted": self._predicted.pop(layer, None)}
        self.trace.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.cache is not None:
            self.cache.close()
        if self.trace is not None:
            self.trace.close()
