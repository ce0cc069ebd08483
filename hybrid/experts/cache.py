"""RAM expert cache: a pool of aligned slots, filled from the shard files by IO threads.

Owns slot bookkeeping (free / loading / ready, pins), explicit reads (pread into the slot, O_DIRECT
where the filesystem allows; never page-fault streaming), eviction through a hybrid.experts.policy, and
per-layer statistics. Each MoE layer's kernels_cpu.ExpertTable points into the one arena; a slot's
location is written into the table when it is assigned. It never computes.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kernels_cpu.table import PARTS, ExpertTable

from hybrid.checkpoint.reader import Checkpoint, CheckpointError
from hybrid.checkpoint.layout import expert_prefix
from hybrid.experts.policy import make_policy

log = logging.getLogger(__name__)

PAGE = 4096
DEMAND, PREFETCH = 0, 1  # IO priorities: what the current layer waits for goes first


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    prefetched: int = 0  # loads started by prefetch
    prefetch_used: int = 0  # demanded experts that a prefetch had brought in
    bytes_read: int = 0
    io_s: float = 0.0


@dataclass(frozen=True)
class Span:
    """Where one expert's six tensors lie in its shard: one read covers them all."""

    file: Path
    start: int  # page-aligned file offset of the read
    length: int  # page-multiple read length
    rel: tuple[int, ...]  # each part's offset from `start`, in PARTS order
    need: int  # bytes from `start` that must be present (the rest is padding)


def expert_span(ckpt: Checkpoint, layer: int, e: int) -> Span:
    infos = []
    for part in PARTS:
        proj, suffix = part.split(".")
        infos.append(ckpt.info(f"{expert_prefix(layer, e, proj)}.{suffix}"))
    files = {i.file for i in infos}
    if len(files) != 1:
        raise CheckpointError(f"expert {layer}.{e} is split over {len(files)} shards; cache mode needs one expert per shard")
    lo = min(i.offset for i in infos)
    hi = max(i.offset + i.nbytes for i in infos)
    start = lo // PAGE * PAGE
    length = -(-(hi - start) // PAGE) * PAGE
    return Span(infos[0].file, start, length, tuple(i.offset - start for i in infos), hi - start)


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    key: tuple[int, int] = field(compare=False)
    slot: int = field(compare=False)
    future: Future = field(compare=False)


class ExpertCache:
    def __init__(self, ckpt: Checkpoint, n_slots: int, io_threads: int = 2, policy: str = "lrfu", direct: bool = True):
        cfg = ckpt.config
        if n_slots < 1:
            raise ValueError(f"cache_slots must be >= 1, got {n_slots}")
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads} (without IO threads nothing would load)")
        self.ckpt = ckpt
        self.spans = {(l, e): expert_span(ckpt, l, e) for l in cfg.moe_layers for e in range(cfg.n_routed_experts)}
        self.slot_bytes = max(s.length for s in self.spans.values())
        self.n_slots = n_slots
        raw = np.empty(n_slots * self.slot_bytes + PAGE, dtype=np.uint8)
        skip = (-raw.ctypes.data) % PAGE
        self.arena = raw[skip:skip + n_slots * self.slot_bytes]  # page-aligned, as O_DIRECT needs
        self.tables: dict[int, ExpertTable] = {}
        for layer in cfg.moe_layers:
            loc = np.zeros((cfg.n_routed_experts, len(PARTS), 2), dtype=np.int64)
            for e in range(cfg.n_routed_experts):  # until loaded, point at slot 0 (in range, never computed)
                loc[e, :, 1] = self.spans[(layer, e)].rel
            self.tables[layer] = ExpertTable([self.arena], loc, cfg.hidden_size, cfg.moe_intermediate_size, cfg.group_size)
        self.policy = make_policy(policy)
        self.slot_of: dict[tuple[int, int], int] = {}
        self.key_of: list[tuple[int, int] | None] = [None] * n_slots
        self._free = list(range(n_slots - 1, -1, -1))  # empty slots, lowest on top
        # (rank, seq, key) of keys that were ready and unpinned when pushed: a victim is found by popping
        # until an entry still holds (ready, unpinned, its rank unchanged), not by scanning every slot
        self._evictable: list[tuple[tuple, int, tuple[int, int]]] = []
        self.ready: set[tuple[int, int]] = set()
        self.loading: dict[tuple[int, int], Future] = {}
        self.pins: dict[tuple[int, int], int] = {}
        self.prefetched: set[tuple[int, int]] = set()
        self.stats: dict[int, LayerStats] = {l: LayerStats() for l in cfg.moe_layers}
        self.clock = 0
        self.lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        self._direct = direct
        self._queue: list[_Job] = []
        self._seq = itertools.count()
        self._wake = threading.Condition(self.lock)
        self._closed = False
        self.io_threads = io_threads
        self._threads = [threading.Thread(target=self._io_loop, name=f"expert-io-{i}", daemon=True) for i in range(io_threads)]
        for t in self._threads:
            t.start()

    # ---- called by the scheduler (any thread) ----------------------------------------------
    def pin_ready(self, layer: int, experts: list[int]) -> tuple[list[int], list[int]]:
        """Pin the resident ones among `experts`; -> (resident, missing). Counts hits and misses."""
        resident, missing = [], []
        with self.lock:
            self.clock += 1
            st = self.stats[layer]
            for e in experts:
                key = (layer, e)
                self.policy.access(key, self.clock)
                if key in self.ready:
                    self.pins[key] = self.pins.get(key, 0) + 1
                    resident.append(e)
                    st.hits += 1
                else:
                    missing.append(e)
                    st.misses += 1
                if key in self.prefetched:
                    self.prefetched.discard(key)
                    st.prefetch_used += 1
        return resident, missing

    def load(self, layer: int, e: int, priority: int = DEMAND, pin: bool = False) -> Future | None:
        """Start loading (layer, e) unless resident or loading; None when no slot can be freed now.
        pin=True pins it at once, so it cannot be evicted between arriving and being computed."""
        key = (layer, e)
        with self.lock:
            fut = self._load_locked(key, priority)
            if fut is not None and pin:
                self.pins[key] = self.pins.get(key, 0) + 1
        return fut

    def _load_locked(self, key: tuple[int, int], priority: int) -> Future | None:
        layer = key[0]
        if key in self.loading:
            fut = self.loading[key]
            if priority == DEMAND:  # promote a queued prefetch
                for job in self._queue:
                    if job.key == key and job.priority > DEMAND:
                        job.priority = DEMAND
                heapq.heapify(self._queue)
            return fut
        if key in self.ready:
            fut = Future()
            fut.set_result(key)
            return fut
        slot = self._free_slot()
        if slot is None:
            return None
        if self.key_of[slot] is not None:
            old = self.key_of[slot]
            self.ready.discard(old)
            self.prefetched.discard(old)
            del self.slot_of[old]
        self.key_of[slot] = key
        self.slot_of[key] = slot
        fut = Future()
        self.loading[key] = fut
        if priority == PREFETCH:
            self.prefetched.add(key)
            self.stats[layer].prefetched += 1
        heapq.heappush(self._queue, _Job(priority, next(self._seq), key, slot, fut))
        self._wake.notify()
        return fut

    def wait_for_a_load(self) -> bool:
        """Wait until one of the loads in flight ends (read, or failed: either way its slot can be
        had again) -> True; False at once when none is in flight. For a caller that found every slot
        loading: an earlier request that failed on one read leaves its other reads queued, holding
        their slots until the IO threads get to them."""
        with self.lock:
            futures = list(self.loading.values())
        if not futures:
            return False
        wait_futures(futures, return_when=FIRST_COMPLETED)
        return True

    def unpin(self, layer: int, experts: list[int]) -> None:
        with self.lock:
            for e in experts:
                key = (layer, e)
                n = self.pins.get(key, 0) - 1
                if n > 0:
                    self.pins[key] = n
                else:
                    self.pins.pop(key, None)
                    self._offer(key)

    def evict_all(self) -> None:
        with self.lock:
            for key in list(self.ready):
                if not self.pins.get(key):
                    self.ready.discard(key)
                    slot = self.slot_of.pop(key)
                    self.key_of[slot] = None
                    self._free.append(slot)

    def close(self) -> None:
        """Stop the IO threads (a read in progress finishes), fail what is still queued, close the files."""
        with self.lock:
            self._closed = True
            self._wake.notify_all()
            queued, self._queue = self._queue, []
        for t in self._threads:
            t.join(timeout=30)
        for job in queued:
            job.future.set_exception(RuntimeError("the expert cache was closed"))
        with self.lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def reset_stats(self) -> None:
        with self.lock:
            for layer in self.stats:
                self.stats[layer] = LayerStats()

    # ---- internals ------------------------------------------------------------------------
    def _free_slot(self) -> int | None:
        """An empty slot, else the slot of the evictable key of least rank (the policy's victim), else None."""
        if self._free:
            return self._free.pop()
        while self._evictable:
            rank, _, key = heapq.heappop(self._evictable)
            if key in self.ready and not self.pins.get(key) and rank == self.policy.rank(key):
                return self.slot_of[key]
        return None  # a key left out here (pinned, loading, ranked anew) is offered again when it is evictable

    def _offer(self, key: tuple[int, int]) -> None:
        """key may be evictable now (ready and unpinned): enter it at its current rank."""
        if key in self.ready and not self.pins.get(key):
            heapq.heappush(self._evictable, (self.policy.rank(key), next(self._seq), key))
            if len(self._evictable) > 4 * self.n_slots + 64:  # stale entries pile up: keep the live ones
                self._evictable = [(self.policy.rank(k), next(self._seq), k) for k in self.ready if not self.pins.get(k)]
                heapq.heapify(self._evictable)

    def _fd(self, path: Path) -> int:
        with self.lock:
            return self._open(path)

    def _open(self, path: Path) -> int:
        if self._closed:
            raise RuntimeError("the expert cache was closed")
        fd = self._fds.get(path)
        if fd is None:
            flags = os.O_RDONLY
            if self._direct and hasattr(os, "O_DIRECT"):
                try:
                    fd = os.open(path, flags | os.O_DIRECT)
                except OSError:  # tmpfs and some overlays refuse O_DIRECT: buffered reads then
                    fd = None
            if fd is None:
                fd = os.open(path, flags)
            self._fds[path] = fd
        return fd

    def _read(self, key: tuple[int, int], slot: int) -> None:
        span = self.spans[key]
        base = slot * self.slot_bytes
        view = memoryview(self.arena[base:base + span.length])
        t0 = time.perf_counter()
        try:
            fd = self._fd(span.file)
            got = 0
            while got < span.need:
                n = os.preadv(fd, [view[got:]], span.start + got)
                if n <= 0:
                    break
                got += n
        except OSError as e:
            raise CheckpointError(f"{span.file}: read of expert {key[1]} of layer {key[0]} failed ({e.strerror}); "
                                  "is the disk still there?") from None
        if got < span.need:
            raise CheckpointError(f"{span.file}: short read for expert {key[1]} of layer {key[0]} "
                                  f"({got} of {span.need} bytes); the shard shrank or vanished")
        dt = time.perf_counter() - t0
        with self.lock:
            st = self.stats[key[0]]
            st.bytes_read += got
            st.io_s += dt
            loc = self.tables[key[0]].loc
            loc[key[1], :, 0] = 0
            loc[key[1], :, 1] = base + np.asarray(span.rel, dtype=np.int64)

    def _io_loop(self) -> None:
        while True:
            with self.lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                job = heapq.heappop(self._queue)
            try:
                self._read(job.key, job.slot)
            except BaseException as e:  # handed to whoever waits on this expert
                with self.lock:
                    self.loading.pop(job.key, None)
                    if self.slot_of.get(job.key) == job.slot:
                        del self.slot_of[job.key]
                        self.key_of[job.slot] = None
                        self._free.append(job.slot)
                job.future.set_exception(e)
                continue
            with self.lock:
                self.loading.pop(job.key, None)
                self.ready.add(job.key)
                self._offer(job.key)
            job.future.set_result(job.key)
