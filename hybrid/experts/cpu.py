"""CPU dispatch of the routed experts: kernels_cpu.moe_forward over ExpertTables, on one worker thread
(beside a GPU side) or on the caller's thread when its result is asked for (the GPU side on the CPU).

Owns the worker, the order of work over the RAM cache (experts already resident run first while the
misses load; a cache smaller than the layer's working set loads in waves) and the CPU's counters
(kernel time, IO waits, bytes, prefill rate). It does not choose experts, prefetch or touch a device.
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

import numba
import numpy as np

from kernels_cpu.moe import moe_forward
from kernels_cpu.table import ExpertTable

from hybrid.experts.cache import DEMAND, ExpertCache


class CpuExperts:
    """Routed sums on the CPU: submit(...) -> a Future of y fp32 [T, D] (host).

    tables: ExpertTables over the mmap'd shards; or cache: the RAM slot cache (whose tables they are).
    threads: numba threads for the kernels (None: numba's default).
    on_caller: compute when the Future's result is asked for, on the asking thread, instead of on the
    worker. For a GPU side on the CPU: its products and the experts' are bound by the same RAM and
    cores, and running them at once (two thread teams, 4 threads on 2 cores) measured no faster;
    one after the other, each kernel gets every core and the bench's account adds up."""

    def __init__(self, tables: dict[int, ExpertTable] | None = None, cache: ExpertCache | None = None,
                 threads: int | None = None, on_caller: bool = False):
        if (tables is None) == (cache is None):
            raise ValueError("CpuExperts needs either mmap tables or a cache")
        self.cache = cache
        self.tables = cache.tables if cache else tables
        self.on_caller, self._threads = on_caller, threads
        self._unasked: list[Future] = []  # on-caller work over cache slots: pinned until it has run
        # numba's thread count is per calling thread: set it on the worker that runs the kernels
        init = (lambda: numba.set_num_threads(_capped(threads))) if threads else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experts", initializer=init)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.compute_s = self.io_wait_s = 0.0
        self.expert_bytes = 0  # expert bytes the kernels read (unique experts per call)
        self.prefill_tokens = 0  # token-layers of multi-token calls the CPU computed, and their time:
        self.prefill_s = 0.0  # the CPU's prefill rate, for the long-prompt upload decision

    def prefill_rate(self) -> float:
        """Tokens per second one MoE layer's experts ran at in prefills so far (0.0: none measured)."""
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    def submit(self, layer: int, xn: np.ndarray, idn: np.ndarray, wn: np.ndarray, used: list[int]) -> Future:
        """Start layer's sum over the pairs with a non-zero weight: xn fp32 [T, D], idn int64 [T, K],
        wn fp32 [T, K] (read by the worker until the Future is done); used: their experts, sorted."""
        if xn.shape[0] > 1:  # the CPU's prefill rate: this layer's tokens, over its kernel calls' time
            self.prefill_tokens += xn.shape[0]
        if self.cache is None:
            return self._start(self._kernel, layer, xn, idn, wn, len(used))
        self._settle()
        # pin what is resident and start the misses before any prefetch can take their slots
        resident, missing = self.cache.pin_ready(layer, used)
        started, waiting = {}, []
        for e in missing:
            fut = self.cache.load(layer, e, DEMAND, pin=True)
            if fut is None:
                waiting.append(e)
            else:
                started[e] = fut
        return self._start(self._run_cached, layer, xn, idn, wn, resident, started, waiting)

    def _start(self, fn, *args) -> Future:
        """fn(*args) on the worker, or (on_caller) on the thread that first asks for the result."""
        if not self.on_caller:
            return self._pool.submit(fn, *args)
        fut = _OnCaller(fn, args, self._threads)
        if self.cache is not None:
            self._unasked = [f for f in self._unasked if not f.done()] + [fut]
        return fut

    def _settle(self) -> None:
        """Run the cache-mode on-caller work nobody asked for (a forward that failed between submit and
        wait, a deferred half dropped): only running it unpins its slots. Its result and error go
        nowhere; their asker is gone."""
        for f in self._unasked:
            if not f.done():
                try:
                    f.result()
                except Exception:  # noqa: BLE001 (nobody to hand it to)
                    pass
        self._unasked = []

    def decode_table(self, layer: int) -> tuple[ExpertTable, int] | None:
        """(layer's table, the kernels' thread count) where a call is moe_forward over mmap'd tables on the
        caller's thread (on_caller, no RAM cache), which a caller may then run itself; else None."""
        if self.cache is not None or not self.on_caller:
            return None
        return self.tables[layer], _capped(self._threads) if self._threads else numba.get_num_threads()

    def count(self, layer: int, tokens: int, experts: int, seconds: float) -> None:
        """Add a kernel call over `tokens` tokens and `experts` distinct experts that took `seconds` (one a
        caller ran over decode_table's table) to the counters, as submit and _kernel count theirs."""
        self.compute_s += seconds
        if tokens > 1:
            self.prefill_tokens += tokens
            self.prefill_s += seconds
        self.expert_bytes += experts * self.tables[layer].expert_nbytes

    @staticmethod
    def done_zeros(xn: np.ndarray) -> Future:
        """A finished Future of zeros shaped like xn: the CPU's share when another side computed it all."""
        fut: Future = Future()
        fut.set_result(np.zeros_like(xn))
        return fut

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ---- worker side --------------------------------------------------------------------------
    def _kernel(self, layer: int, x: np.ndarray, ids: np.ndarray, w: np.ndarray, n_experts: int) -> np.ndarray:
        t0 = time.perf_counter()
        y = moe_forward(x, ids, w, self.tables[layer])
        dt = time.perf_counter() - t0
        self.compute_s += dt
        if x.shape[0] > 1:  # tokens are counted once per layer call (submit), time per kernel call
            self.prefill_s += dt
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
                    if cache.wait_for_a_load():  # slots held by reads an earlier, failed request left queued
                        continue
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


def _capped(threads: int) -> int:
    """The kernels' thread count asked for, within the threads Numba started."""
    return min(threads, numba.config.NUMBA_NUM_THREADS)


class _OnCaller(Future):
    """A Future whose work runs on the first thread that asks for its result (CpuExperts.on_caller),
    with the kernels' thread count set there for the call."""

    def __init__(self, fn, args: tuple, threads: int | None):
        super().__init__()
        self._work = (fn, args, threads)

    def result(self, timeout: float | None = None):
        if self._work is not None:
            fn, args, threads = self._work
            self._work = None
            before = numba.get_num_threads()
            if threads:
                numba.set_num_threads(_capped(threads))
            try:
                self.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 (handed to the asker, as a worker's Future does)
                self.set_exception(e)
            finally:
                numba.set_num_threads(before)
        return super().result(timeout)
