"""Eviction policies for the RAM expert cache, shared by the live cache and the trace replayer.

Owns the choice of victim only: a policy sees accesses (key, time) and ranks keys; the victim is the
evictable key of least rank. A rank changes only when its key is accessed (never with the clock),
so a cache may keep keys in a heap by rank. Keys are (layer, expert). No IO, no buffers.
"""
from __future__ import annotations

import math
from typing import Hashable, Iterable, Protocol

Key = Hashable


class Policy(Protocol):
    def access(self, key: Key, now: int) -> None: ...

    def rank(self, key: Key) -> tuple: ...

    def victim(self, candidates: Iterable[Key], now: int) -> Key: ...


class _Ranked:
    def victim(self, candidates: Iterable[Key], now: int) -> Key:
        """The candidate of least rank (now is not needed: ranks do not age)."""
        return min(candidates, key=self.rank)


class LRU(_Ranked):
    def __init__(self) -> None:
        self.last: dict[Key, int] = {}

    def access(self, key: Key, now: int) -> None:
        self.last[key] = now

    def rank(self, key: Key) -> tuple:
        return (self.last.get(key, -1),)


class LFU(_Ranked):
    """Frequency counts survive eviction (the hot set of a MoE layer is stable over a conversation)."""

    def __init__(self) -> None:
        self.count: dict[Key, int] = {}
        self.last: dict[Key, int] = {}

    def access(self, key: Key, now: int) -> None:
        self.count[key] = self.count.get(key, 0) + 1
        self.last[key] = now

    def rank(self, key: Key) -> tuple:
        return self.count.get(key, 0), self.last.get(key, -1)


class LRFU(_Ranked):
    """Recency and frequency in one score (Lee et al.'s LRFU): crf = sum over past accesses of
    2^(-lam * age). lam -> 0 is LFU, large lam is LRU. Evict the smallest current score.
    At any time `now`, log2(score) = log2(crf at last access) + lam * last - lam * now: ranking by the
    first two terms orders keys as their current scores do, without aging them."""

    def __init__(self, lam: float = 0.01) -> None:
        self.lam = lam
        self.crf: dict[Key, float] = {}
        self.last: dict[Key, int] = {}

    def _score(self, key: Key, now: int) -> float:
        return self.crf.get(key, 0.0) * math.pow(2.0, -self.lam * (now - self.last.get(key, now)))

    def access(self, key: Key, now: int) -> None:
        self.crf[key] = self._score(key, now) + 1.0
        self.last[key] = now

    def rank(self, key: Key) -> tuple:
        crf = self.crf.get(key, 0.0)
        last = self.last.get(key, -1)
        return (math.log2(crf) + self.lam * last if crf > 0 else -math.inf), last


POLICIES = {"lru": LRU, "lfu": LFU, "lrfu": LRFU}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"cache policy {name!r} is not known; choose one of {', '.join(POLICIES)}") from None
