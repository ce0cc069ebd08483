"""The expert-backend interface: a backend that implements only submit and wait plugs into the engine
and its decode step unchanged (experts elsewhere, say), and the Numba backend keeps its hot-expert
buffers for good: refresh_hot puts them back where set_hot replaced them."""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import hybrid
from hybrid.experts.backend import ExpertBackend
from hybrid.experts.reference import ReferenceExperts
from hybrid.experts.hot import HotSlots
from hybrid.runtime.engine import Engine
from hybrid.checkpoint.reader import Checkpoint
from kernels_cpu.simd import host_has_avx2

PROMPT = list(range(5, 30))


class Elsewhere(ExpertBackend):
    """Only the seam: the routed sum computed by another object, as a remote backend would."""

    def __init__(self, ckpt: Checkpoint):
        self.remote = ReferenceExperts(ckpt)
        self.calls = 0

    def submit(self, layer, x, ids, weights):
        self.calls += 1
        return self.remote.submit(layer, x, ids, weights)

    def wait(self, handle) -> torch.Tensor:
        return self.remote.wait(handle)


def test_the_interface_needs_submit_and_wait():
    with pytest.raises(TypeError, match="abstract"):
        ExpertBackend()


@pytest.mark.parametrize("decode_mode", [None, "auto"])
def test_a_backend_with_only_submit_and_wait_plugs_into_the_engine(tiny_path, decode_mode):
    """Its defaults (no host hops, prefetch, hot experts or counts) run the plain forward and the decode
    step's segment mode, and give the reference backend's tokens."""
    ckpt, ref_ckpt = Checkpoint(tiny_path), Checkpoint(tiny_path)
    backend = Elsewhere(ckpt)
    eng = Engine(ckpt, backend, context=64, decode_mode=decode_mode)
    ref = Engine(ref_ckpt, ReferenceExperts(ref_ckpt), context=64)
    got = [s.token for s in eng.generate(PROMPT, 6, temperature=0)]
    want = [s.token for s in ref.generate(PROMPT, 6, temperature=0)]
    assert got == want and backend.calls > 0
    assert eng.hot_experts == 0 and (eng.decoder is None) == (decode_mode is None)
    if decode_mode is not None:
        assert eng.decoder.mode == "segments" and eng.decoder.steps == 5
    st = eng.stats()
    assert st["experts_compute_s"] == 0.0 and st["cache"] is None and st["tokens"] == {"prefill": len(PROMPT), "decode": 5}
    eng.close()
    ref.close()


@pytest.mark.skipif(not host_has_avx2(), reason="the Numba INT4 kernels need AVX2 + FMA")
def test_refresh_puts_the_backends_own_hot_buffers_back(tiny_path):
    eng = hybrid.load(tiny_path, backend="numba", expert_mode="mmap", hot_experts=2, decode_graphs="off")
    ex = eng.model.experts
    layer = eng.config.moe_layers[0]
    own = ex.hot[layer]
    assert isinstance(own, HotSlots) and len(own) == 0 and ex.hot_capacity == eng.hot_experts == 2
    list(eng.generate(PROMPT, 1, temperature=0))  # routing counts to choose from
    ex.set_hot(layer, {})
    assert ex.hot[layer] == {}
    with pytest.raises(TypeError):
        ex.hot[layer] = own  # the view is read-only: set_hot is the one way in
    ex.refresh_hot()
    counts = ex.route_counts[layer]
    assert ex.hot[layer] is own and sorted(own) == sorted(int(e) for e in np.argsort(-counts, kind="stable")[:2])
    eng.close()


@pytest.mark.skipif(not host_has_avx2(), reason="the Numba INT4 kernels need AVX2 + FMA")
def test_experts_on_the_callers_thread_when_the_gpu_side_is_the_cpu(tiny_path):
    """With the GPU side on the CPU the routed experts run on the thread that asks for them (on_caller):
    nothing runs at submit, the sum equals the worker's, and a failure reaches the asker. The engine
    loaded with device='cpu' works that way; the reference backend's sum is the oracle."""
    import threading

    from hybrid.experts.cpu import CpuExperts
    from hybrid.experts.mmap_tables import mmap_tables

    ckpt = Checkpoint(tiny_path)
    cfg, layer = ckpt.config, ckpt.config.moe_layers[0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, cfg.hidden_size)).astype(np.float32)
    ids = np.stack([rng.choice(cfg.n_routed_experts, cfg.num_experts_per_tok, replace=False) for _ in range(3)])
    w = rng.uniform(0.1, 1, ids.shape).astype(np.float32)
    want = ReferenceExperts(ckpt).wait(ReferenceExperts(ckpt).submit(layer, torch.from_numpy(x), torch.from_numpy(ids),
                                                                     torch.from_numpy(w))).numpy()
    worker, caller = CpuExperts(tables=mmap_tables(ckpt)), CpuExperts(tables=mmap_tables(ckpt), on_caller=True)
    try:
        used = sorted(set(ids.ravel().tolist()))
        fut = caller.submit(layer, x, ids, w, used)
        assert caller.compute_s == 0 and not fut.done()  # nothing ran yet
        seen = []
        asker = threading.Thread(target=lambda: seen.append(fut.result()))
        asker.start()
        asker.join(60)
        assert caller.compute_s > 0 and fut.done()
        got_worker = worker.submit(layer, x, ids, w, used).result()
        np.testing.assert_allclose(seen[0], got_worker, rtol=1e-6, atol=1e-6 * np.abs(got_worker).max())
        np.testing.assert_allclose(seen[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        bad = caller.submit(layer, x, np.full_like(ids, cfg.n_routed_experts), w, used)
        with pytest.raises(ValueError, match="expert ids"):
            bad.result()
    finally:
        worker.close()
        caller.close()
    eng = hybrid.load(tiny_path, backend="numba", device="cpu")
    try:
        assert eng.model.experts.cpu.on_caller
    finally:
        eng.close()


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of this process's mapping that holds address addr (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps") or not hasattr(mmap, "MADV_HUGEPAGE"),
                    reason="needs Linux's smaps and madvise(MADV_HUGEPAGE)")
def test_mmap_mode_advises_the_expert_shards_for_huge_pages_and_nothing_else(tiny_path):
    """mmap mode streams its experts from the shard maps every token, so the maps it builds its tables
    over are advised for huge pages (VmFlags 'hg'): the first fault then caches a 2 MB folio. A map the
    rest of the engine reads once (the non-expert weights, copied at load) stays plain."""
    from hybrid.experts.mmap_tables import mmap_tables

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off or missing on this machine")
    tables = mmap_tables(Checkpoint(tiny_path))
    arenas = {a.ctypes.data: a for t in tables.values() for a in t.arenas}
    assert arenas
    for addr in arenas:
        assert "hg" in _vm_flags(addr)
    ckpt = Checkpoint(tiny_path)
    plain = ckpt.file_buffer(ckpt.info("model.embed_tokens.weight").file)
    assert "hg" not in _vm_flags(plain.ctypes.data)


@pytest.mark.skipif(not host_has_avx2(), reason="the Numba INT4 kernels need AVX2 + FMA")
@pytest.mark.skipif(not os.path.exists("/proc/self/io") or not hasattr(os, "posix_fadvise"),
                    reason="needs Linux's /proc/self/io and posix_fadvise")
def test_mmap_mode_counts_what_the_page_cache_did_not_hold_as_read_from_disk(make_checkpoint):
    """mmap mode keeps no cache of its own, so its 'read from disk' (the bench's disk_bytes_per_token) is what
    the faults on the shard maps read. With the shards' untouched pages dropped from the page cache after
    loading, a request reads at least the expert bytes its kernels used; the same prompt again (reused, its
    last token recomputed through the same experts, now cached) reads nothing."""
    path = make_checkpoint(seed=11)  # this test's own files: no other test holds their pages mapped
    eng = hybrid.load(path, backend="numba", expert_mode="mmap", device="cpu")
    try:
        for f in sorted(path.glob("*.safetensors")):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # written by this session: clean pages only can be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        prompt = [5, 9, 2, 7, 1, 3]
        got = []
        for _ in range(2):
            eng.reset_stats()
            for _ in eng.generate(prompt, max_new_tokens=1, temperature=0.0):
                pass
            got.append(eng.stats())
        assert got[0]["expert_bytes"] > 0 and got[0]["bytes_read"] >= got[0]["expert_bytes"], got[0]
        assert got[1]["expert_bytes"] > 0 and got[1]["bytes_read"] == 0, got[1]
    finally:
        eng.close()


def test_unasked_on_caller_work_releases_its_cache_slots(tiny_path):
    """Cache mode, experts on the caller's thread: work submitted and never asked for (a forward that
    failed between submit and wait) still unpins its slots by the next submit, so they stay evictable."""
    from hybrid.experts.cache import ExpertCache
    from hybrid.experts.cpu import CpuExperts

    ckpt = Checkpoint(tiny_path)
    cfg, layer = ckpt.config, ckpt.config.moe_layers[0]
    cache = ExpertCache(ckpt, cfg.n_routed_experts)
    cpu = CpuExperts(cache=cache, on_caller=True)
    try:
        x = np.ones((1, cfg.hidden_size), np.float32)
        ids = np.arange(cfg.num_experts_per_tok)[None]
        w = np.full(ids.shape, 0.5, np.float32)
        used = ids[0].tolist()
        cpu.submit(layer, x, ids, w, used)  # never asked for
        assert cache.pins  # held until the work runs
        second = cpu.submit(layer, x, ids + cfg.num_experts_per_tok, w, (ids[0] + cfg.num_experts_per_tok).tolist())
        assert {k[1] for k in cache.pins} <= set((ids[0] + cfg.num_experts_per_tok).tolist())  # the first's are gone
        second.result()
        assert not cache.pins
    finally:
        cpu.close()
        cache.close()


@pytest.mark.skipif(not host_has_avx2(), reason="the Numba INT4 kernels need AVX2 + FMA")
def test_a_request_waits_for_slots_that_earlier_reads_still_hold(tiny_path):
    """A request that failed on one read leaves its other reads queued, each holding a slot. The next
    request, finding every slot loading, waits for one to end instead of failing 'no slot free'
    (seen under load in CI); its answer is the reference backend's."""
    import threading

    from hybrid.experts.cache import ExpertCache
    from hybrid.experts.cpu import CpuExperts

    ckpt = Checkpoint(tiny_path)
    cfg, layer = ckpt.config, ckpt.config.moe_layers[0]
    cache = ExpertCache(ckpt, 3, io_threads=1)
    cpu = CpuExperts(cache=cache, on_caller=True)
    gate, refused = threading.Event(), threading.Event()
    real_read, real_load = cache._read, cache.load

    def held_read(key, slot):  # the IO thread waits until the test lets the reads go
        gate.wait(30)
        return real_read(key, slot)

    def noting_load(*args, **kwargs):  # notes when a load finds no slot to take
        fut = real_load(*args, **kwargs)
        if fut is None:
            refused.set()
        return fut

    cache._read, cache.load = held_read, noting_load
    try:
        for e in range(3):  # the earlier request's reads: every slot loading, nothing pinned
            assert real_load(layer, e) is not None
        x = np.random.default_rng(0).standard_normal((1, cfg.hidden_size)).astype(np.float32)
        ids = np.array([[3, 4, 5, 6][:cfg.num_experts_per_tok]])
        w = np.full(ids.shape, 0.25, np.float32)
        outcome: dict = {}
        work = cpu.submit(layer, x, ids, w, ids[0].tolist())
        t = threading.Thread(target=lambda: outcome.update(y=work.result()))
        t.start()
        assert refused.wait(30)  # it found no slot while the reads were held
        gate.set()
        t.join(60)
        assert "y" in outcome, "the request failed instead of waiting for a slot"
        ref = ReferenceExperts(ckpt)
        want = ref.wait(ref.submit(layer, torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(w)))
        np.testing.assert_allclose(np.asarray(outcome["y"]), want.numpy(), rtol=1e-3, atol=1e-4)
    finally:
        gate.set()
        cpu.close()
        cache.close()
