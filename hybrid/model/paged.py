"""The latent cache in pages: a bounded pool of pages and a sequence's view of it through a page table.

Owns PagePool (pages of P positions x every layer's 576-value row: the normed latent [L] and the
roped key [R], in one dtype on one device, with reference counts so sequences and a prefix tree may
share them) and PagedKVCache (one sequence: its page table, copy-on-write before writing a shared
page, and the rows the attention reads). Model.attention uses it like the contiguous KVCache
(write / rows); which pages it may take, and what to evict or spill, is the allocator's business
(runtime/kv_store.py), handed in. A table entry e >= 0 is page e of the main pool, e < 0 page -1 - e
of the spill pool (the host tier). No tree, no eviction, no files here.
Letters: S positions, P page size, W = L + R row width, N pages.
"""
from __future__ import annotations

from typing import Callable

import numba
import numpy as np
import torch

from kernels_cpu.mla import MAX_TOKENS as MLA_MAX_TOKENS
from kernels_cpu.mla import mla_decode as cpu_mla_decode
from kernels_cpu.paged import gather_rows
from kernels_cpu.widen import concurrent_parallel_ok
from kernels_gpu.mla import mla_decode

ATTEND_BLOCK = 4096  # positions gathered at a time for CPU decode attention (K2: 9.4 MB of fp32 rows), a page multiple


class PoolFull(RuntimeError):
    """No page is free in a pool and nothing could be evicted or spilled to make one."""


class PagePool:
    """data [layers, N, P, W] on `device` in `dtype`; pages handed out by alloc() and shared by refcount."""

    def __init__(self, layers: int, pages: int, page_size: int, width: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.bfloat16, pin: bool = False):
        if pages < 1 or page_size < 1:
            raise ValueError(f"a page pool needs >= 1 page of >= 1 position, got {pages} x {page_size}")
        self.data = torch.zeros(layers, pages, page_size, width, device=device, dtype=dtype,
                                pin_memory=pin and torch.cuda.is_available())
        self.page_size, self.pages = page_size, pages
        self.refs = np.zeros(pages, np.int32)
        self._free = list(range(pages - 1, -1, -1))  # pop() hands out low ids first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def alloc(self) -> int | None:
        """A free page with one reference, or None when all are taken."""
        if not self._free:
            return None
        p = self._free.pop()
        self.refs[p] = 1
        return p

    def incref(self, p: int) -> None:
        if self.refs[p] <= 0:
            raise RuntimeError(f"page {p} is not allocated")
        self.refs[p] += 1

    def decref(self, p: int) -> bool:
        """Drop a reference; True when the page became free."""
        if self.refs[p] <= 0:
            raise RuntimeError(f"page {p} is not allocated")
        self.refs[p] -= 1
        if self.refs[p] == 0:
            self._free.append(p)
            return True
        return False


class Pages:
    """The two pools and entry-level refcounting over them (e >= 0 main, e < 0 spill)."""

    def __init__(self, main: PagePool, spill: PagePool | None = None):
        self.main, self.spill = main, spill
        self.page_size = main.page_size

    def pool(self, e: int) -> tuple[PagePool, int]:
        if e >= 0:
            return self.main, e
        if self.spill is None:
            raise RuntimeError(f"page entry {e} names the spill pool, which this store does not have")
        return self.spill, -1 - e

    def incref(self, e: int) -> None:
        pool, p = self.pool(e)
        pool.incref(p)

    def decref(self, e: int) -> bool:
        pool, p = self.pool(e)
        return pool.decref(p)

    def refs(self, e: int) -> int:
        pool, p = self.pool(e)
        return int(pool.refs[p])

    def page(self, e: int) -> torch.Tensor:
        """[layers, P, W]: the page's data, a view into its pool."""
        pool, p = self.pool(e)
        return pool.data[:, p]

    def copy(self, src: int, dst: int, rows: int) -> None:
        """The first `rows` positions of page src into page dst, every layer (across pools too)."""
        self.page(dst)[:, :rows].copy_(self.page(src)[:, :rows])


Allocate = Callable[[], int]  # a fresh page entry with one reference held by the caller, or PoolFull


class PagedKVCache:
    """One sequence's latent cache: `pages` (its entries in order, one reference each), `length`.

    write() and rows() are what Model.attention calls, as on KVCache; prepare(s0, s1) makes positions
    s0..s1-1 writable first (allocating pages through `allocate`, copying a shared page before it is
    written). rows() on a CPU computing in fp32 gathers and widens the pages into a reused fp32
    block (kernels_cpu.paged); elsewhere it gathers them with torch in the pool's dtype."""

    def __init__(self, pages: Pages, layers: int, kv_dim: int, max_len: int, allocate: Allocate,
                 compute_dtype: torch.dtype):
        self.store, self.layers, self.kv_dim, self.max_len = pages, layers, kv_dim, max_len
        self.allocate = allocate
        self.compute_dtype = compute_dtype
        self.pages: list[int] = []
        self.length = 0
        P = pages.page_size
        self._max_pages = -(-max_len // P)
        self.table = np.zeros(self._max_pages, np.int32)  # the numpy mirror the CPU gather reads
        device = pages.main.data.device
        self.table_dev = torch.zeros(self._max_pages, dtype=torch.long, device=device)  # for writes by device index
        self._dirty = True  # entries changed since the table was last written
        self._spilled = 0  # entries in the spill pool, counted when the table is written
        self._scratch = np.zeros((0, pages.main.data.shape[-1]), np.float32)
        self.bytes_read = 0  # cache bytes rows() read, for the bench's account
        self._step_pools: dict[int, tuple] = {}  # layer -> (main, spill, kv_b, step_pages' numpy pools or None)

    # ---- the page table ----------------------------------------------------------------------
    def set_pages(self, entries: list[int], length: int) -> None:
        """Adopt `entries` (their references now this cache's) holding `length` positions."""
        if entries is not self.pages:
            self.pages[:] = entries
        self.length = length
        self._dirty = True
        self._sync()

    def release(self) -> list[int]:
        """Hand back the entries (the caller drops or keeps their references); the cache is empty after."""
        out = list(self.pages)
        self.pages.clear()
        self.length = 0
        self._dirty = True
        self._sync()
        return out

    def _sync(self) -> None:
        """The table (numpy, and on the device for captured steps) after the entries changed; else nothing
        (on CUDA each copy waits for the stream)."""
        if not self._dirty:
            return
        n = len(self.pages)
        self.table[:n] = self.pages
        self.table[n:] = 0
        self.table_dev[:] = torch.from_numpy(np.maximum(self.table, 0).astype(np.int64))
        self._spilled = int((self.table[:n] < 0).sum())
        self._dirty = False

    def truncate(self, n: int) -> None:
        """Forget positions >= n (their pages stay with the sequence until it is released)."""
        self.length = min(self.length, n)

    def prepare(self, s0: int, s1: int) -> None:
        """Positions s0..s1-1 writable: pages allocated up to s1, and a page shared with others
        (the prefix tree, another sequence) replaced by a private copy before it is written."""
        if s1 > self.max_len:
            raise ValueError(f"{s1} positions exceed the KV cache of {self.max_len}; raise the context size")
        P = self.store.page_size
        for k in range(s0 // P, min(len(self.pages), -(-s1 // P))):
            e = self.pages[k]
            if self.store.refs(e) > 1:  # copy on write: the others keep the page as it is
                self.store.incref(e)  # allocating may evict the tree's reference and then spill e itself
                try:
                    fresh = self.allocate()
                    self.store.copy(e, fresh, P)
                finally:
                    self.store.decref(e)
                self.store.decref(e)  # the cache's own reference
                self.pages[k] = fresh
                self._dirty = True
        try:
            while len(self.pages) * P < s1:
                e = self.allocate()  # may move earlier pages to the spill pool: the table is read afterwards
                self.pages.append(e)
                self._dirty = True
        finally:  # consistent even when a pool ran out part-way
            self._sync()

    def spilled(self) -> int:
        """Pages of this sequence in the spill pool (asked per layer and token: kept, not recounted)."""
        return self._spilled

    # ---- what the attention calls ------------------------------------------------------------
    def write(self, i: int, s0: int | torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Layer i's rows for the T new positions s0.. (latent [T, L], k_pe [T, R]); s0 an int, or a
        0-d device tensor (a captured decode step: the position lives on the device; main pool only)."""
        L, P = self.kv_dim, self.store.page_size
        if isinstance(s0, torch.Tensor):
            if self.spilled():
                raise RuntimeError("a captured decode step cannot write a sequence with spilled pages")
            pos = s0 + torch.arange(latent.shape[0], device=latent.device)
            flat = self.table_dev[pos // P] * P + pos % P
            rows = torch.cat((latent, k_pe), dim=-1).to(self.store.main.data.dtype)
            self.store.main.data[i].view(-1, rows.shape[-1]).index_copy_(0, flat, rows)
            return
        t = 0
        while t < latent.shape[0]:
            pos = s0 + t
            page = self.store.page(self.pages[pos // P])[i]  # [P, W]
            r0 = pos % P
            n = min(P - r0, latent.shape[0] - t)
            page[r0:r0 + n, :L] = latent[t:t + n]
            page[r0:r0 + n, L:] = k_pe[t:t + n]
            t += n

    def rows(self, i: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's first S positions -> (kv [S, L], k_pe [S, R]) in the compute dtype (views of one
        gathered [S, W] block, valid until the next rows() call). Positions past the pages' end read
        page 0: a captured step's span masks them."""
        main = self.store.main.data
        self.bytes_read += S * main.shape[-1] * main.element_size()
        if main.device.type == "cpu" and self.compute_dtype == torch.float32:
            block = self._gather_cpu(i, S)
        else:
            block = self._gather_torch(i, S)
        return block[:, :self.kv_dim], block[:, self.kv_dim:]

    def attend(self, i: int, S: int, q_lat: torch.Tensor, q_pe: torch.Tensor, scale: float,
               offset: int | torch.Tensor) -> torch.Tensor:
        """Absorbed attention of q_lat [T, H, L], q_pe [T, H, R] over layer i's first S positions -> o_lat
        [T, H, L]. On a CPU computing in fp32: blocks of ATTEND_BLOCK positions gathered and widened into
        a cache-sized buffer, each read by the GEMM at once (the widened rows never go to DRAM); else
        kernels_gpu.mla over the gathered rows."""
        if self.store.main.data.device.type == "cpu" and self.compute_dtype == torch.float32:
            return self._attend_cpu(i, S, q_lat, q_pe, scale, int(offset))
        kv, pe = self.rows(i, S)
        return mla_decode(q_lat, q_pe, kv, pe, None, None, scale, offset, absorbed=True)

    def decode_attention(self, i: int, s0: int, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         kv_b_heads: torch.Tensor, scale: float, kv: torch.Tensor, norm: torch.Tensor,
                         eps: float) -> torch.Tensor | None:
        """A decode step's attention for layer i in one Numba call (kernels_cpu.mla): its T new rows
        written from kv_a_proj's output kv [T, L + R] (the latent RMSNorm'd with norm and eps, the key's
        rope part rotated: what write stores), then q_b_proj's output q [T, H, P + R] roped, absorbed
        through kv_b_heads [H, P + V, L] and attended over positions 0..s0+T-1 -> o [T, H, V]. None,
        with nothing written, where it does not apply (see step_pages; q, kv or norm not fp32): the
        caller then takes the separate steps (write, attend)."""
        if q.dtype != torch.float32 or kv.dtype != torch.float32 or norm.dtype != torch.float32:
            return None
        pages = self.step_pages(i, s0, q.shape[0], kv_b_heads)
        if pages is None:
            return None
        return torch.from_numpy(cpu_mla_decode(q.numpy(), cos.numpy(), sin.numpy(), _as_numpy(kv_b_heads), *pages, s0,
                                               scale, numba.get_num_threads(), kv.numpy(), norm.numpy(), eps))

    def step_pages(self, i: int, s0: int, T: int, kv_b_heads: torch.Tensor
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Layer i's pools as numpy (main, spill: a one-page dummy without a host tier) and the page table,
        for T new tokens at s0 attended in one Numba call over kv_b_heads [H, P + V, L] (kernels_cpu.mla,
        kernels_cpu.attn_step), with the cache bytes that call reads counted. None where that does not
        apply: not a CPU computing in fp32, too many tokens, heads not a multiple of 4,
        kv_b_heads neither fp32 nor bf16 or not contiguous, a second parallel region not allowed."""
        S = s0 + T
        if T > MLA_MAX_TOKENS:
            return None
        main, spill = self.store.main.data, self.store.spill
        got = self._step_pools.get(i)  # per layer, while the pools and kv_b stay the same objects: each
        if got is None or got[0] is not main or got[1] is not spill or got[2] is not kv_b_heads:  # step asks
            got = self._step_pools[i] = (main, spill, kv_b_heads, self._numpy_pools(i, kv_b_heads))
        if got[3] is None:
            return None
        self.bytes_read += S * main.shape[-1] * main.element_size()
        return (*got[3], self.table)

    def _numpy_pools(self, i: int, kv_b_heads: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """step_pages' layer i pools as numpy (main, spill), or None where its one call does not apply."""
        main = self.store.main.data
        if main.device.type != "cpu" or self.compute_dtype != torch.float32 or kv_b_heads.shape[0] % 4 \
                or not concurrent_parallel_ok() or kv_b_heads.dtype not in (torch.float32, torch.bfloat16) \
                or not kv_b_heads.is_contiguous():
            return None
        pool = _as_numpy(main[i])
        return pool, _as_numpy(self.store.spill.data[i]) if self.store.spill is not None else pool[:1]

    def _attend_cpu(self, i: int, S: int, q_lat: torch.Tensor, q_pe: torch.Tensor, scale: float,
                    offset: int) -> torch.Tensor:
        T, H, L = q_lat.shape
        B = ATTEND_BLOCK
        q = torch.cat((q_lat, q_pe), dim=-1).reshape(T * H, -1)  # [N, W]: one GEMM for both parts of a score
        main = self.store.main.data
        self.bytes_read += S * main.shape[-1] * main.element_size() * (1 if S <= B else 2)
        scores = torch.empty(S, T * H)  # [S, N]: a block's scores are contiguous rows
        for b0 in range(0, S, B):
            block = self._gather_cpu(i, min(S, b0 + B), b0)  # [n, W] fp32
            torch.mm(block, q.T, out=scores[b0:b0 + block.shape[0]])
        scores.mul_(scale)
        if T > 1 or offset < S - 1:  # query t at offset + t sees positions <= offset + t
            hidden = torch.arange(S)[:, None] > offset + torch.arange(T)[None, :]  # [S, T]
            scores.view(S, T, H).masked_fill_(hidden[:, :, None], float("-inf"))
        p = torch.softmax(scores, dim=0)
        if S <= B:  # one block: still in the buffer
            return (p.T @ block[:, :L]).view(T, H, L)
        o = torch.zeros(T * H, L)
        for b0 in range(0, S, B):
            block = self._gather_cpu(i, min(S, b0 + B), b0)
            o.addmm_(p[b0:b0 + block.shape[0]].T, block[:, :L])
        return o.view(T, H, L)

    def _gather_cpu(self, i: int, S: int, start: int = 0) -> torch.Tensor:
        if self._scratch.shape[0] < S - start:
            self._scratch = np.empty((max(S - start, 2 * self._scratch.shape[0]), self._scratch.shape[1]), np.float32)
        main = _as_numpy(self.store.main.data[i])
        spill = _as_numpy(self.store.spill.data[i]) if self.store.spill is not None else main[:1]
        return torch.from_numpy(gather_rows(main, spill, self.table, S, self._scratch, concurrent_parallel_ok(),
                                            start))

    def _gather_torch(self, i: int, S: int) -> torch.Tensor:
        P = self.store.page_size
        n = -(-S // P)
        main = self.store.main.data[i]  # [N, P, W]
        if not self.spilled():
            return main.index_select(0, self.table_dev[:n]).view(-1, main.shape[-1])[:S].to(self.compute_dtype)
        t = self.table[:n]
        out = torch.empty(n, P, main.shape[-1], dtype=main.dtype, device=main.device)
        here = torch.from_numpy(t >= 0).to(main.device)
        out[here] = main.index_select(0, self.table_dev[:n][here])
        # the host tier's pages in one copy (pinned on CUDA: the copy overlaps what was queued before it)
        host = self.store.spill.data[i].index_select(0, torch.from_numpy(-1 - t[t < 0]).long())
        out[~here] = host.to(main.device, non_blocking=True)
        return out.view(-1, main.shape[-1])[:S].to(self.compute_dtype)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU pool's layer as numpy: bf16 as its uint16 bits, fp32 as it is (no copy)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()
