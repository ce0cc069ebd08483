"""Which rank holds and computes which routed expert: every MoE layer's experts split across all ranks.

Owns placement: each expert's primary rank, in proportion to the ranks' measured bandwidth and capped
by the experts their RAM holds (interleaved and rotated layer by layer, so no rank holds a contiguous
block), a share node's experts kept where its files are, then replicas of the most-routed experts on
ranks with RAM to spare. Splitting every layer, rather than giving ranks whole layers, is what lets
all machines read their share of each layer at once. Per call, choose.py picks among the replicas.
Nothing here talks to the network.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

MAX_RANKS = 64  # holders is a uint64 bit mask per expert


@dataclass(frozen=True)
class ClusterPlan:
    """owner uint8 [moe layers, E]: each routed expert's primary rank (what it computes when nobody else
    can); holders uint64 [moe layers, E]: bit r set when rank r holds the expert (owner and replicas)."""

    world: int
    moe_layers: tuple[int, ...]
    owner: np.ndarray
    holders: np.ndarray

    def __post_init__(self):
        if not 1 <= self.world <= MAX_RANKS:
            raise ValueError(f"a cluster has 1..{MAX_RANKS} ranks, got {self.world}")
        if self.owner.shape[0] != len(self.moe_layers) or self.owner.dtype != np.uint8:
            raise ValueError(f"plan: owner must be uint8 [{len(self.moe_layers)}, E], got {self.owner.dtype} "
                             f"{list(self.owner.shape)}")
        if self.owner.size and int(self.owner.max()) >= self.world:
            raise ValueError(f"plan: an expert is given to rank {int(self.owner.max())} of a {self.world}-rank cluster")
        if self.holders.shape != self.owner.shape or self.holders.dtype != np.uint64:
            raise ValueError(f"plan: holders must be uint64 {list(self.owner.shape)}, got {self.holders.dtype} "
                             f"{list(self.holders.shape)}")
        own_bit = np.left_shift(np.uint64(1), self.owner.astype(np.uint64))
        if ((self.holders & own_bit) == 0).any() or (self.holders >> np.uint64(self.world)).any():
            raise ValueError("plan: every expert's owner must hold it, and only ranks of the cluster")

    @property
    def row(self) -> dict[int, int]:
        """MoE layer -> its row in owner."""
        return {layer: i for i, layer in enumerate(self.moe_layers)}

    def digest(self) -> bytes:
        return hashlib.sha256(self.world.to_bytes(2, "little") + self.owner.tobytes()
                              + self.holders.astype("<u8").tobytes()).digest()

    def held_by(self, rank: int) -> np.ndarray:
        """bool [moe layers, E]: what rank holds (its primaries and its replicas)."""
        return (self.holders >> np.uint64(rank)) & np.uint64(1) == 1

    def experts_of(self, rank: int) -> int:
        """Routed experts rank is the primary of, over all MoE layers."""
        return int((self.owner == rank).sum())

    def held_of(self, rank: int) -> int:
        """Routed experts rank holds, replicas included."""
        return int(self.held_by(rank).sum())

    @property
    def replicated(self) -> bool:
        return bool((self.holders & (self.holders - np.uint64(1))).any())  # some mask with two bits


@dataclass(frozen=True)
class RankFigures:
    """What placement knows of a rank: measured read GB/s, the RAM it gives its experts (0: unknown,
    no limit), and for a share node (kimi-hybrid split) the experts its files hold (None: every one)."""

    gbps: float
    budget_bytes: int = 0
    holds: np.ndarray | None = None  # bool [moe layers, E]


def split(moe_layers: list[int], n_experts: int, weights: list[float]) -> ClusterPlan:
    """Each layer's experts over len(weights) ranks, rank r getting a share in proportion to
    weights[r] (largest remainder; ties go round the ranks layer by layer, so totals stay even),
    interleaved, with the pattern rotated by one expert per layer. No replicas."""
    owner = np.stack([_deal_layer(n_experts, weights, i) for i in range(len(moe_layers))]) if moe_layers else \
        np.zeros((0, n_experts), np.uint8)
    return ClusterPlan(len(weights), tuple(moe_layers), owner, _bits(owner))


def _deal_layer(n: int, weights, i: int) -> np.ndarray:
    """uint8 [n]: n experts of layer row i dealt over the ranks in proportion to weights."""
    world = len(weights)
    w = np.asarray(weights, dtype=np.float64)
    if world < 1 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"split: rank weights must be finite, >= 0 and not all 0, got {list(weights)}")
    share = w / w.sum() * n
    counts = np.floor(share).astype(np.int64)
    turn = np.roll(np.arange(world), -i)  # who goes first among equal remainders
    rest = (share - counts)[turn]
    for r in turn[np.argsort(-rest, kind="stable")][:n - int(counts.sum())]:
        counts[r] += 1
    return np.roll(_deal(counts), i) if n else np.zeros(0, np.uint8)


def _deal(counts: np.ndarray) -> np.ndarray:
    """uint8 [sum(counts)]: ranks dealt like cards, rank r's turns evenly spaced."""
    turns = np.concatenate([(np.arange(c) + 0.5) / c + r * 1e-9 for r, c in enumerate(counts) if c])
    ranks = np.concatenate([np.full(c, r) for r, c in enumerate(counts) if c])
    return ranks[np.argsort(turns, kind="stable")].astype(np.uint8)


def _bits(owner: np.ndarray) -> np.ndarray:
    return np.left_shift(np.uint64(1), owner.astype(np.uint64))


def shares(total: int, ranks: list[RankFigures], expert_bytes: int) -> np.ndarray:
    """float [world]: how many of `total` experts each rank should be the primary of. In proportion to
    gbps; a rank whose RAM budget holds fewer gets what it holds and the rest goes to the others
    (water-filling). When all the budgets together hold less than `total`, in proportion to the budgets
    (every rank then reads misses from its disk alike)."""
    gbps = np.array([max(r.gbps, 1e-3) for r in ranks])
    cap = np.array([r.budget_bytes / expert_bytes if r.budget_bytes else np.inf for r in ranks])
    if cap.sum() < total:
        return cap / cap.sum() * total
    out = np.zeros(len(ranks))
    free = np.ones(len(ranks), bool)
    left = float(total)
    while free.any():
        want = gbps * free / gbps[free].sum() * left
        over = free & (want > cap)
        if not over.any():
            return out + want
        out[over] = cap[over]
        left -= cap[over].sum()
        free &= ~over
    return out


def place(moe_layers: list[int], n_experts: int, ranks: list[RankFigures], expert_bytes: int,
          hotness: Mapping[int, np.ndarray] | None = None) -> ClusterPlan:
    """The cluster's plan: primaries (share nodes keep what their files hold; every other expert dealt
    over the ranks that hold the full checkpoint, in proportion to what shares() leaves them), then in
    each rank's spare RAM replicas of the most-routed experts (hotness: layer -> routing counts [E];
    none known: every expert alike). Rank 0 (the head) holds the full checkpoint."""
    world, L = len(ranks), len(moe_layers)
    if not 1 <= world <= MAX_RANKS or ranks[0].holds is not None:
        raise ValueError(f"place: 1..{MAX_RANKS} ranks, rank 0 (the head) with the full checkpoint")
    target = shares(L * n_experts, ranks, expert_bytes)
    owner = np.zeros((L, n_experts), np.uint8)
    claimed = np.zeros((L, n_experts), bool)
    for r, f in enumerate(ranks):  # a share node computes what its files hold (the first to claim it)
        if f.holds is not None:
            mine = f.holds & ~claimed
            owner[mine], claimed = r, claimed | mine
            target[r] = 0.0
    full = [r for r, f in enumerate(ranks) if f.holds is None]
    weights = np.array([target[r] for r in full])
    if weights.sum() <= 0:
        weights = np.ones(len(full))
    for i in range(L):
        free = np.flatnonzero(~claimed[i])
        owner[i, free] = np.array(full, np.uint8)[_deal_layer(len(free), weights, i)]
    holders = _bits(owner)
    for r, f in enumerate(ranks):
        holders |= _replicas(r, f, owner, expert_bytes, moe_layers, hotness)
    return ClusterPlan(world, tuple(moe_layers), owner, holders)


def _replicas(rank: int, f: RankFigures, owner: np.ndarray, expert_bytes: int, moe_layers: list[int],
              hotness: Mapping[int, np.ndarray] | None) -> np.ndarray:
    """uint64 [L, E]: rank's bit on the experts it replicates: per layer an equal part of its spare RAM,
    the most-routed experts it can hold and is not the primary of."""
    L, E = owner.shape
    out = np.zeros((L, E), np.uint64)
    can = (owner != rank) & (f.holds if f.holds is not None else True)
    mine = int((owner == rank).sum())
    spare = L * E if not f.budget_bytes else max(0, f.budget_bytes // expert_bytes - mine)
    per_layer = spare // L if L else 0
    if per_layer <= 0:
        return out
    for i, layer in enumerate(moe_layers):
        counts = np.asarray(hotness[layer], np.float64) if hotness and layer in hotness else np.zeros(E)
        order = np.argsort(-counts, kind="stable")  # hottest first; alike: by id
        pick = order[can[i][order]][:per_layer]
        out[i, pick] = np.uint64(1) << np.uint64(rank)
    return out
