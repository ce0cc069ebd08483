"""Eviction policies on hand-built access sequences, and the trace replayer against them."""
from __future__ import annotations

import json

from hybrid.policy import LFU, LRFU, LRU
from hybrid.replay import read_trace, simulate


def feed(policy, seq):
    for t, k in enumerate(seq):
        policy.access(k, t)
    return len(seq)


def test_lru_lfu_lrfu_victims():
    seq = ["a", "a", "a", "b", "c"]  # a is frequent but old; b is older than c
    now = feed(LRU(), seq)
    lru, lfu = LRU(), LFU()
    feed(lru, seq), feed(lfu, seq)
    assert lru.victim({"a", "b", "c"}, now) == "a"  # least recent
    assert lfu.victim({"a", "b", "c"}, now) == "b"  # least frequent, then least recent
    recency, frequency = LRFU(lam=10.0), LRFU(lam=1e-6)
    feed(recency, seq), feed(frequency, seq)
    assert recency.victim({"a", "b", "c"}, now) == "a"  # large lambda behaves like LRU
    assert frequency.victim({"a", "b", "c"}, now) == "b"  # lambda -> 0 behaves like LFU


def test_belady_is_optimal_and_policies_differ():
    # a cyclic scan over 4 keys (0 1 2 3 0 1 2 3 ..., 24 accesses) with 3 slots: LRU always evicts the key
    # needed next, so it never hits. Belady, by hand: t0-t2 are cold misses; at t3 (key 3) it evicts the
    # resident key used furthest ahead (2, next at t6), so t4 (0) and t5 (1) hit; t6 (2) misses and evicts
    # 1 (next at t9), so t7, t8 hit; and so on: a miss at t = 3, 6, ..., 21 (7 misses), each followed by
    # two hits. Hits = 24 - 3 - 7 = 14.
    calls = [[(1, k)] for k in [0, 1, 2, 3] * 6]
    assert simulate(calls, 3, "lru") == 0.0
    bel = simulate(calls, 3, "belady")
    assert bel == 14 / 24
    for p in ("lru", "lfu", "lrfu"):
        assert simulate(calls, 3, p) <= bel
    assert simulate(calls, 4, "lru") == 20 / 24  # everything fits: only the 4 cold misses


def test_read_trace_and_prefetch_coverage(tmp_path):
    recs = [
        {"layer": 1, "token": 0, "experts": [[0, 1]], "weights": [[0.5, 0.5]], "predicted": None},
        {"layer": 2, "token": 0, "experts": [[3, 4]], "weights": [[0.5, 0.0]], "predicted": [3, 9]},
        {"layer": 2, "token": 1, "experts": [[5, 6]], "weights": [[0.5, 0.5]], "predicted": [5, 7]},
    ]
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    calls, cov = read_trace(p)
    assert calls == [[(1, 0), (1, 1)], [(2, 3)], [(2, 5), (2, 6)]]  # zero weights are not accesses
    assert cov == 2 / 3
