"""The engine's KV store: page pools, the prefix tree over them, the live sequence, the disk tier.

Owns KVStore. A request begins with the longest prefix of its prompt that any earlier request left
(the tree, then the disk tier), shares those pages, copies the page where it diverges, and prefills
the rest; when it ends its pages join the tree. When the main pool has no free page, the least
recently used leaves go (saved to the disk tier first, when there is one); when no leaf is left, the
live sequence's oldest pages move to the spill pool (the host tier); when that is full too, the
request fails with what to raise. Never more pages than the pools were built with. The math reads
pages through model/paged.py; the files are runtime/prefix_disk.py's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from hybrid.model.paged import Pages, PagedKVCache, PagePool, PoolFull
from hybrid.runtime.prefix_disk import DiskPrefixCache
from hybrid.runtime.options import PAGE_SIZE
from hybrid.runtime.prefix_tree import Node, PrefixTree

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class KVSizes:
    """How big the store is: positions per page, pages in the main pool and in the spill pool."""
    page_size: int
    pages: int
    spill_pages: int = 0

    @staticmethod
    def for_tokens(tokens: int, spill_tokens: int = 0, page_size: int = PAGE_SIZE) -> "KVSizes":
        return KVSizes(page_size, max(1, -(-tokens // page_size)), -(-spill_tokens // page_size))


class KVStore:
    """Pools on `device` (spill pool in host RAM, pinned on CUDA), the tree, and `cache`: the live sequence."""

    def __init__(self, layers: int, kv_dim: int, pe_dim: int, max_len: int, sizes: KVSizes,
                 device: torch.device | str, dtype: torch.dtype, compute_dtype: torch.dtype,
                 disk: DiskPrefixCache | None = None):
        device = torch.device(device)
        W = kv_dim + pe_dim
        main = PagePool(layers, sizes.pages, sizes.page_size, W, device, dtype)
        spill = PagePool(layers, sizes.spill_pages, sizes.page_size, W, "cpu", dtype, pin=device.type == "cuda") \
            if sizes.spill_pages else None
        self.sizes, self.disk = sizes, disk
        self.pages = Pages(main, spill)
        self.tree = PrefixTree(sizes.page_size, self.pages.incref, self.pages.decref)
        self.cache = PagedKVCache(self.pages, layers, kv_dim, max_len, self._allocate, compute_dtype)
        self.held: list[int] = []  # the tokens the live sequence's pages hold, as of finish()
        self.counts = {"requests": 0, "prompt_tokens": 0, "reused_tokens": 0, "disk_tokens": 0,
                       "evicted_pages": 0, "spilled_pages": 0, "disk_saves": 0}

    # ---- a request's life ----------------------------------------------------------------------
    def begin(self, prompt: list[int]) -> int:
        """Make `cache` hold the longest prefix of prompt on record (tree or disk) -> its length."""
        self._drop_live()
        m = self.tree.match(prompt)
        if self.disk is not None and m.tokens < len(prompt) - 1:
            self._from_disk(prompt, m.tokens)
            m = self.tree.match(prompt)  # always: loading may have evicted what matched before
        entries = []
        for node in m.full:
            self.pages.incref(node.page)
            entries.append(node.page)
        self.cache.set_pages(entries, len(entries) * self.sizes.page_size)
        if m.partial is not None:  # the diverging page: ours is a copy of its first rows
            self.pages.incref(m.partial.page)  # evictions while allocating must not free it
            fresh = self._allocate()
            self.pages.copy(m.partial.page, fresh, m.rows)
            self.pages.decref(m.partial.page)
            self.cache.pages.append(fresh)
            self.cache.set_pages(self.cache.pages, m.tokens)
        self._unspill()
        self.counts["requests"] += 1
        self.counts["prompt_tokens"] += len(prompt)
        self.counts["reused_tokens"] += min(m.tokens, len(prompt) - 1)  # the last token is always recomputed
        return m.tokens

    def _unspill(self) -> None:
        """Adopted pages in the host tier come back to the compute device while it has free pages (one
        kept for writing), so the conversation decodes from its own pool (and through a captured step)."""
        cache, main, moved = self.cache, self.pages.main, False
        for k, e in enumerate(cache.pages):
            if e < 0 and main.free > 1:
                fresh = main.alloc()
                self.pages.copy(e, fresh, self.sizes.page_size)
                self.pages.decref(e)
                cache.pages[k] = fresh
                moved = True
        if moved:
            cache.set_pages(cache.pages, cache.length)

    def finish(self, ids: list[int]) -> None:
        """The live sequence holds `ids` (len == cache.length): its pages join the tree."""
        n = min(len(ids), self.cache.length)
        self.held = ids[:n]
        if n:
            self.tree.insert(ids[:n], self.cache.pages[:-(-n // self.sizes.page_size)])

    def _drop_live(self) -> None:
        for e in self.cache.release():
            self.pages.decref(e)

    def close(self) -> None:
        """Save what the tree holds to the disk tier (when there is one), then free every page."""
        self._drop_live()
        if self.disk is not None:
            for leaf in self.tree.leaves():
                self._save(leaf)
        self.tree.clear()

    # ---- pages ---------------------------------------------------------------------------------
    def _allocate(self) -> int:
        """A fresh main-pool page: free, or freed by evicting leaves, or by spilling the live
        sequence's oldest page to the spill pool."""
        main = self.pages.main
        while (p := main.alloc()) is None:
            leaf = self.tree.evict_leaf(before=self._save if self.disk is not None else None)
            if leaf is None:
                self._spill_oldest()
            else:
                self.counts["evicted_pages"] += 1
        return p

    def _spill_oldest(self) -> None:
        cache, spill = self.cache, self.pages.spill
        k = next((k for k, e in enumerate(cache.pages) if e >= 0 and self.pages.refs(e) == 1), None)
        if spill is None or k is None:
            raise PoolFull(self._full_message())
        h = spill.alloc()
        if h is None:
            raise PoolFull(self._full_message())
        e = cache.pages[k]
        self.pages.copy(e, -1 - h, self.sizes.page_size)
        self.pages.decref(e)
        cache.pages[k] = -1 - h
        cache.set_pages(cache.pages, cache.length)
        self.counts["spilled_pages"] += 1

    def _full_message(self) -> str:
        s = self.sizes
        return (f"the KV cache is full: {s.pages} pages of {s.page_size} positions on the compute device and "
                f"{s.spill_pages} in host RAM hold this conversation and no earlier one is left to evict; "
                "raise the context (--context), or give the cache more room (--kv-spill-tokens)")

    # ---- the disk tier -------------------------------------------------------------------------
    def _save(self, leaf: Node) -> None:
        ids, entries = self.tree.path(leaf)
        kv, pe = self._read(entries, len(ids))
        try:
            self.disk.save(ids, kv, pe)
            self.counts["disk_saves"] += 1
        except OSError as e:
            log.warning("could not save a %d-token prefix to %s: %s", len(ids), self.disk.directory, e)

    def _read(self, entries: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions 0..n-1 of pages `entries` on the host: kv [layers, n, L], pe [layers, n, R]."""
        rows = torch.cat([self.pages.page(e).to("cpu") for e in entries], dim=1)[:, :n]
        L = self.cache.kv_dim
        return rows[..., :L].contiguous(), rows[..., L:].contiguous()

    def _from_disk(self, prompt: list[int], have: int) -> bool:
        """Bring a longer prefix than the tree's from the disk tier into fresh pages and the tree."""
        found = self.disk.longest(prompt)
        if found is None or found[0] <= have:
            return False
        n, entry = found
        P = self.sizes.page_size
        n = min(n, (self.pages.main.pages - 1) * P)  # what the pool holds beside a page to write into
        if n <= have:
            return False
        loaded = self.disk.load(entry, n)
        if loaded is None:
            return False
        kv, pe = loaded
        entries = []
        rows = torch.cat((kv, pe), dim=-1)  # [layers, n, W]
        try:
            for k in range(-(-n // P)):
                e = self._allocate()
                entries.append(e)
                chunk = rows[:, k * P:(k + 1) * P]
                self.pages.page(e)[:, :chunk.shape[1]].copy_(chunk)
        except PoolFull:
            for e in entries:
                self.pages.decref(e)
            return False
        self.tree.insert(prompt[:n], entries)
        for e in entries:  # the tree holds them now
            self.pages.decref(e)
        self.counts["disk_tokens"] += n
        return True

    # ---- figures -------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)
        self.cache.bytes_read = 0

    def stats(self) -> dict:
        main, spill = self.pages.main, self.pages.spill
        return {**self.counts, "page_size": self.sizes.page_size,
                "pages": main.pages, "pages_free": main.free,
                "spill_pages": spill.pages if spill else 0, "spill_pages_free": spill.free if spill else 0,
                "spilled_now": self.cache.spilled(), "tree_pages": self.tree.nodes,
                "bytes": main.nbytes + (spill.nbytes if spill else 0),
                "kv_bytes_read": self.cache.bytes_read}
