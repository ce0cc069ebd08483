"""Routed-expert storage in ram mode: every routed expert read into the process's own memory at load, on
2 MB pages, and ExpertTables over that copy.

Owns ram_tables: one arena a MoE layer (checkpoint/host_memory.py's huge_bytes), its experts one after
another, each part on a cache line. mmap mode holds the same
bytes in the page cache and reads them through the shard maps; a file's page-cache pages are 2 MB ones
only where the first map to fault them in was advised so and they stayed cached (reader.file_buffer), and on
a VM a page-cache page may also sit in slower memory than the process's own (runtime/probe.py's tiers).
Anonymous memory advised for huge pages gets them whatever the page cache holds: one translation for each
2 MB a decode streams instead of up to 512, which a VM pays twice (its own page tables, then the host's).
k2-slice's routed experts for one token (8 of 48 a layer, 595 MB), read in place after a 512 MB read, 2-core
Xeon VM, one sitting: 30.3-30.7 GB/s through the shard maps (1.3 of their 3.6 GB mapped as huge pages), 31.2-31.6
copied to 4 KB pages, 35.0 copied to 2 MB pages; `bench --device cpu`, two interleaved pairs a mode, int8w
17.44 / 17.12 -> 18.72 / 18.49 tok/s, bf16w 11.86 / 11.68 -> 12.25 / 12.68 (the token's bytes read in place
34.2-36.9 -> 37.3-39.6 GB/s, level with the probe's own buffer); a later sitting, the shards' page cache
re-read into faster memory by then, three rounds: int8w 17.54 / 17.07 / 17.55 -> 17.24 / 18.05 / 18.07, bf16w
level (11.61-12.06 against 11.67-11.98). The cost: the load reads every expert before
the first token (what mmap mode's first tokens fault in), and the copy is the process's alone (another process
over the same checkpoint does not share it, and the kernel cannot drop it under memory pressure, as it can page
cache). An expert node (cluster/node.py) copies only its share (held); the head of a cluster copies its own
share once the nodes have joined (copy_share), the rest read through the shard maps.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping

import numpy as np

from kernels_cpu.table import ALIGN, ExpertTable

from hybrid.checkpoint.host_memory import huge_bytes
from hybrid.checkpoint.reader import Checkpoint
from hybrid.experts.mmap_tables import mmap_tables

log = logging.getLogger(__name__)


def ram_tables(ckpt: Checkpoint, held: np.ndarray | None = None) -> dict[int, ExpertTable]:
    """One ExpertTable a MoE layer over a huge_bytes arena holding a copy of its routed experts, read from the
    shard files (validated by Checkpoint already) through their maps. held: bool [MoE layers, E], the experts
    to copy (an expert node's share); the others then point at a copied one of their layer (its first, or
    expert 0's copy where the layer holds none), as a share's stand-ins do: never computed, never read."""
    return _copied(mmap_tables(ckpt), held, mapped_rest=False)


def copy_share(tables: MutableMapping[int, ExpertTable], held: np.ndarray) -> None:
    """ram mode on the head of a cluster: a backend's mmap tables (its CpuExperts' own dict, which its long-prompt
    upload shares) replaced in place by tables whose held experts (bool [MoE layers, E], the plan's share once
    the nodes have joined) are copied as ram_tables copies them, every other expert read through the same maps
    as before: the head computes those only once its nodes are lost."""
    tables.update(_copied(tables, held, mapped_rest=True))
    log.info("ram mode: the head's %d routed experts copied into this process", int(held.sum()))


def _copied(src_tables: Mapping[int, ExpertTable], held: np.ndarray | None,
            mapped_rest: bool) -> dict[int, ExpertTable]:
    """src_tables (over the shard maps) with the held experts (None: all) copied; the rest per mapped_rest: in
    place in the maps (kept after the copy among the arenas), else stand-ins (ram_tables)."""
    tables = {}
    for i, (layer, src) in enumerate(sorted(src_tables.items())):
        sizes = [int(n) for n in src.part_nbytes]
        spans = [-(-n // ALIGN) * ALIGN for n in sizes]
        per = sum(spans)
        copied = np.flatnonzero(held[i]) if held is not None else np.arange(src.num_experts)
        copied = copied if len(copied) or mapped_rest else np.zeros(1, np.int64)
        arena = huge_bytes(max(1, len(copied) * per))
        loc = np.zeros_like(src.loc)
        for slot, e in enumerate(copied):
            at = slot * per
            for m, n in enumerate(sizes):
                a, off = (int(v) for v in src.loc[e, m])
                arena[at:at + n] = src.arenas[a][off:off + n]
                loc[e, m] = (0, at)
                at += spans[m]
        rest = np.setdiff1d(np.arange(src.num_experts), copied)
        if mapped_rest:
            loc[rest] = src.loc[rest]
            loc[rest, :, 0] += 1  # the maps follow the copy among the arenas
        else:
            loc[rest] = loc[copied[0]]
        tables[layer] = ExpertTable([arena] + (list(src.arenas) if mapped_rest else []), loc, src.hidden, src.inter,
                                    src.group)
        log.debug("ram mode: layer %d's %d routed experts copied (%.2f GB)", layer, len(copied),
                  len(copied) * per / 1e9)
    return tables
