"""Eviction policies for the RAM expert cache, shared by the live cache and the trace replayer.

Owns the choice of victim only: a policy sees accesses (key, time) and is asked which of the
evictable keys to drop. Keys are (layer, expert). No IO, no buffers.
"""
from __future__ import annotations

import math
from typing import Hashable, Iterable, Protocol

Key = Hashable


class Policy(Protocol):
    def access(self, key: Key, now: int) -> None: ...

    def victim(self, candidates: Iterable[Key], now: int) -> Key: ...


class LRU:
    def __init__(self) -> None:
        self.last: dict[Key, int] = {}

    def access(self, key: Key, now: int) -> None:
        self.last[key] = now

    def victim(self, candidates: Iterable[Key], now: int) -> Key:
        return min(candidates, key=lambda k: self.last.get(k, -1))


class LFU:
    """Frequency counts survive eviction (the hot set of a MoE layer is stable over a conversation)."""

    def __init__(self) -> None:
        self.count: dict[Key, int] = {}
        self.last: dict[Key, int] = {}

    def access(self, key: Key, now: int) -> None:
        self.count[key] = self.count.get(key, 0) + 1
        self.last[key] = now

    def victim(self, candidates: Iterable[Key], now: int) -> Key:
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last.get(k, -1)))


class LRFU:
    """Recency and frequency in one score (Lee et al.'s LRFU): crf = sum over past accesses of
    2^(-lam * age). lam -> 0 is LFU, large lam is LRU. Evict the smallest current score."""

    def __init__(self, lam: float = 0.01) -> None:
        self.lam = lam
        self.crf: dict[Key, float] = {}
        self.last: dict[Key, int] = {}

    def _score(self, key: Key, now: int) -> float:
        return self.crf.get(key, 0.0) * math.pow(2.0, -self.lam * (now - self.last.get(key, now)))

    def access(self, key: Key, now: int) -> None:
        self.crf[key] = self._score(key, now) + 1.0
        self.last[key] = now

    def victim(self, candidates: Iterable[Key], now: int) -> Key:
        return min(candidates, key=lambda k: (self._score(k, now), self.last.get(k, -1)))


POLICIES = {"lru": LRU, "lfu": LFU, "lrfu": LRFU}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"cache policy {name!r} is not known; choose one of {', '.join(POLICIES)}") from None
