"""Which rank computes which routed expert: every MoE layer's experts split across all ranks.

Owns the split (in proportion to per-rank weights, interleaved and rotated layer by layer so no rank
holds a contiguous block) and the per-pair assignment of one layer call. Splitting every layer,
rather than giving ranks whole layers, is what lets all machines read their share of each layer at
once. Nothing here talks to the network.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

MAX_RANKS = 64


@dataclass(frozen=True)
class ClusterPlan:
    """owner uint8 [moe layers, E]: the rank that holds and computes each routed expert."""

    world: int
    moe_layers: tuple[int, ...]
    owner: np.ndarray

    def __post_init__(self):
        if not 1 <= self.world <= MAX_RANKS:
            raise ValueError(f"a cluster has 1..{MAX_RANKS} ranks, got {self.world}")
        if self.owner.shape[0] != len(self.moe_layers) or self.owner.dtype != np.uint8:
            raise ValueError(f"plan: owner must be uint8 [{len(self.moe_layers)}, E], got {self.owner.dtype} "
                             f"{list(self.owner.shape)}")
        if self.owner.size and int(self.owner.max()) >= self.world:
            raise ValueError(f"plan: an expert is given to rank {int(self.owner.max())} of a {self.world}-rank cluster")

    @property
    def row(self) -> dict[int, int]:
        """MoE layer -> its row in owner."""
        return {layer: i for i, layer in enumerate(self.moe_layers)}

    def digest(self) -> bytes:
        return hashlib.sha256(self.world.to_bytes(2, "little") + self.owner.tobytes()).digest()

    def experts_of(self, rank: int) -> int:
        """Routed experts rank holds, over all MoE layers."""
        return int((self.owner == rank).sum())


def split(moe_layers: list[int], n_experts: int, weights: list[float]) -> ClusterPlan:
    """Each layer's experts over len(weights) ranks, rank r getting a share in proportion to
    weights[r] (largest remainder; ties go round the ranks layer by layer, so totals stay even),
    interleaved, with the pattern rotated by one expert per layer."""
    world = len(weights)
    w = np.asarray(weights, dtype=np.float64)
    if world < 1 or (w <= 0).any() or not np.isfinite(w).all():
        raise ValueError(f"split: rank weights must be finite and above 0, got {weights}")
    share = w / w.sum() * n_experts
    owner = np.zeros((len(moe_layers), n_experts), np.uint8)
    for i in range(len(moe_layers)):
        counts = np.floor(share).astype(np.int64)
        turn = np.roll(np.arange(world), -i)  # who goes first among equal remainders
        rest = (share - counts)[turn]
        for r in turn[np.argsort(-rest, kind="stable")][:n_experts - int(counts.sum())]:
            counts[r] += 1
        owner[i] = np.roll(_deal(counts), i)
    return ClusterPlan(world, tuple(moe_layers), owner)


def _deal(counts: np.ndarray) -> np.ndarray:
    """uint8 [sum(counts)]: ranks dealt like cards, rank r's turns evenly spaced."""
    turns = np.concatenate([(np.arange(c) + 0.5) / c + r * 1e-9 for r, c in enumerate(counts) if c])
    ranks = np.concatenate([np.full(c, r) for r, c in enumerate(counts) if c])
    return ranks[np.argsort(turns, kind="stable")].astype(np.uint8)


def assign(plan: ClusterPlan, row: int, ids: np.ndarray, local: frozenset[int] = frozenset()) -> np.ndarray:
    """uint8 [T, K]: the rank that computes each pair of one layer call (ids int [T, K]); experts in
    `local` (the head's hot experts, which it computes whatever the plan says) go to rank 0."""
    out = plan.owner[row][ids]
    if local:
        out[np.isin(ids, list(local))] = 0
    return out
