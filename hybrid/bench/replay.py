"""Replay routing traces against expert-cache sizes and eviction policies.

Owns the offline simulation only: reads the JSON lines that `hybrid.load(..., trace=FILE)` writes
and counts hits for LRU, LFU, LRFU (the live cache's default) and Belady's optimum, plus how much
of each layer's routing the prefetch candidate set had predicted. The live cache is not touched.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from hybrid.experts.policy import make_policy

Key = tuple[int, int]


def read_trace(path: str | Path) -> tuple[list[list[Key]], float | None]:
    """-> (accesses grouped per layer call, prefetch coverage or None)."""
    calls: list[list[Key]] = []
    covered = total = 0
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        layer = r["layer"]
        keys: list[Key] = []
        for row_e, row_w in zip(r["experts"], r["weights"]):
            keys += [(layer, e) for e, w in zip(row_e, row_w) if w != 0]
        calls.append(list(dict.fromkeys(keys)))
        if r.get("predicted") is not None:
            pred = set(r["predicted"])
            covered += sum(1 for (_, e) in calls[-1] if e in pred)
            total += len(calls[-1])
    return calls, (covered / total if total else None)


def simulate(calls: list[list[Key]], slots: int, policy: str) -> float:
    """Hit rate of a cache of `slots` experts; a layer call's own experts are never evicted for each other."""
    if policy == "belady":  # the optimum: evict what is needed again furthest in the future
        uses: dict[Key, list[int]] = defaultdict(list)
        for t, keys in enumerate(calls):
            for k in keys:
                uses[k].append(t)
        seen: dict[Key, int] = defaultdict(int)

        def access(k: Key, t: int) -> None:
            seen[k] += 1

        def victim(cands: set[Key], t: int) -> Key:
            return max(cands, key=lambda v: uses[v][seen[v]] if seen[v] < len(uses[v]) else 1 << 60)
    else:
        pol = make_policy(policy)
        access, victim = pol.access, pol.victim
    resident: set[Key] = set()
    hits = n = 0
    for t, keys in enumerate(calls):
        for k in keys:
            access(k, t)
        for k in keys:
            n += 1
            if k in resident:
                hits += 1
                continue
            if len(resident) >= slots:
                resident.discard(victim(resident - set(keys) or resident, t))
            resident.add(k)
    return hits / n if n else 0.0


def replay(path: str | Path, fractions: Iterable[float], n_experts: int,
           policies: Iterable[str] = ("lru", "lfu", "lrfu", "belady")) -> dict:
    """Hit rate per (cache size as a fraction of all routed experts, policy), and prefetch coverage."""
    calls, coverage = read_trace(path)
    table = {}
    for f in fractions:
        slots = max(1, round(f * n_experts))
        table[f"{f:g}"] = {"slots": slots, **{p: simulate(calls, slots, p) for p in policies}}
    return {"calls": len(calls), "accesses": sum(map(len, calls)), "prefetch_coverage": coverage, "hit_rate": table}
