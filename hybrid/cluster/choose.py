"""Per MoE layer call: which rank computes each (token, expert) pair, and how uneven that leaves the ranks.

Owns the choice among an expert's holders (plan.py's owner and replicas): an expert one rank holds
goes to it; the replicated ones, the most-used first, each to the holder whose work so far (expert
reads over its speed) ends earliest, the head first on a tie (no network). A rank reads an expert
once per call whatever its tokens, so work counts distinct experts. The same figures for the owners
alone say what the replicas saved. Nothing here talks to the network.
"""
from __future__ import annotations

import numpy as np

from hybrid.cluster.plan import ClusterPlan


class Chooser:
    """speeds: each rank's relative speed (its measured GB/s; only ratios matter)."""

    def __init__(self, plan: ClusterPlan, speeds: list[float]):
        s = np.asarray(speeds, np.float64)
        if s.shape != (plan.world,) or not (s > 0).all():
            raise ValueError(f"Chooser: {plan.world} speeds above 0, got {list(speeds)}")
        self.plan, self.owner, self.speeds = plan, plan.owner, s
        self.cost = s.mean() / s  # one expert read on rank r, in an average rank's reads
        self.multi = plan.holders & (plan.holders - np.uint64(1)) != 0  # bool [L, E]: replicated
        self._rows_multi = self.multi.any(axis=1)
        self._holders: dict[tuple[int, int], np.ndarray] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        self.calls = 0
        self.pairs_ratio = self.load_ratio = self.primary_ratio = 0.0  # summed over calls

    def __call__(self, row: int, ids: np.ndarray, wn: np.ndarray, local: frozenset[int] = frozenset()) -> np.ndarray:
        """uint8 [T, K]: the rank computing each pair of one call (ids int [T, K], wn its weights: a 0
        needs nobody and is given rank 0); `local` (the head's GPU hot experts) goes to rank 0."""
        active = wn != 0
        es, counts = np.unique(ids[active], return_counts=True)  # the call's distinct experts [U]
        primary = self.owner[row][es]
        forced = np.isin(es, list(local)) if local else np.zeros(es.shape, bool)
        primary[forced] = 0
        rank_of = primary
        if self._rows_multi[row]:
            rank_of = self._spread(row, es, counts, primary, forced)
        who = np.zeros(ids.shape, np.uint8)
        who[active] = rank_of[np.searchsorted(es, ids[active])]
        self._count(rank_of[~forced], primary[~forced])
        return who

    def _spread(self, row: int, es: np.ndarray, counts: np.ndarray, primary: np.ndarray,
                forced: np.ndarray) -> np.ndarray:
        rank_of = primary.copy()
        free = self.multi[row][es] & ~forced
        fixed = rank_of[~free & ~forced]
        load = np.bincount(fixed, minlength=self.plan.world) * self.cost
        for j in np.flatnonzero(free)[np.argsort(-counts[free], kind="stable")]:
            hs = self._holders_of(row, int(es[j]))
            r = hs[np.argmin(load[hs] + self.cost[hs])]
            load[r] += self.cost[r]
            rank_of[j] = r
        return rank_of

    def _holders_of(self, row: int, e: int) -> np.ndarray:
        key = (row, e)
        hs = self._holders.get(key)
        if hs is None:
            mask = int(self.plan.holders[row, e])
            hs = self._holders[key] = np.array([r for r in range(self.plan.world) if mask >> r & 1])
        return hs

    def _count(self, rank_of: np.ndarray, primary: np.ndarray) -> None:
        """One call's unevenness: max over ranks of (work / speed) over the ideal (all work / all speed)."""
        if not rank_of.size:
            return
        world = self.plan.world
        work = np.bincount(rank_of, minlength=world)
        self.calls += 1
        self.pairs_ratio += work.max() / (work.sum() / world)
        ideal = work.sum() / (1 / self.cost).sum()
        self.load_ratio += (work * self.cost).max() / ideal
        self.primary_ratio += (np.bincount(primary, minlength=world) * self.cost).max() / ideal

    def stats(self) -> dict:
        """Per layer call on average (None before any): work_max_over_mean (the busiest rank's distinct
        experts over the mean), load_max_over_ideal (the busiest rank's time, its experts over its speed,
        over the perfectly balanced time; 1.0 is even) and the same for the owners alone."""
        n = self.calls
        return {"layer_calls": n, "work_max_over_mean": self.pairs_ratio / n if n else None,
                "load_max_over_ideal": self.load_ratio / n if n else None,
                "load_max_over_ideal_owners_only": self.primary_ratio / n if n else None}
