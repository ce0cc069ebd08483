"""Eviction policies on hand-built access sequences, and the trace replayer against them."""
from __future__ import annotations

import json

from hybrid.experts.policy import LFU, LRFU, LRU
from hybrid.bench.replay import read_trace, simulate


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


def test_ranks_order_keys_as_the_policies_scores_do_now():
    """rank() never ages, yet the least rank is the least current score: for LRFU, against its
    definition (the sum over past accesses of 2^(-lam * age)) evaluated at the victim's time."""
    import math
    import random

    rng = random.Random(0)
    for lam in (1e-3, 0.05, 1.0):
        pol, hist = LRFU(lam=lam), {}
        for t in range(400):
            k = rng.choice("abcdefgh")
            pol.access(k, t)
            hist.setdefault(k, []).append(t)
            if t % 37 == 36:
                now = t + rng.randint(0, 50)
                cands = rng.sample(sorted(hist), 4)
                score = {c: sum(2.0 ** (-lam * (now - a)) for a in hist[c]) for c in cands}
                v = pol.victim(cands, now)
                assert math.isclose(score[v], min(score.values()), rel_tol=1e-9)
    lfu, lru = LFU(), LRU()
    for t, k in enumerate("abacabd"):
        lfu.access(k, t), lru.access(k, t)
    assert lfu.victim("abcd", 9) == "c" and lru.victim("abcd", 9) == "c" and lru.victim("abd", 9) == "a"


def test_the_cache_evicts_the_policys_victim_without_scanning(tiny_path):
    """ExpertCache finds its victim in a heap kept by rank; at every eviction the key it gave up is one
    of least rank among the ready, unpinned keys (what policy.victim would pick from all of them)."""
    import random

    from hybrid.checkpoint.reader import Checkpoint
    from hybrid.experts.cache import DEMAND, PREFETCH, ExpertCache

    ckpt = Checkpoint(tiny_path)
    layers, E = ckpt.config.moe_layers, ckpt.config.n_routed_experts
    for policy in ("lru", "lfu", "lrfu"):
        cache, rng, evictions = ExpertCache(ckpt, 5, io_threads=1, policy=policy), random.Random(1), 0
        try:
            for step in range(300):
                layer, e = rng.choice(layers), rng.randrange(E)
                if rng.random() < 0.6:
                    resident, missing = cache.pin_ready(layer, [e])
                    if resident:
                        cache.unpin(layer, resident)
                        continue
                with cache.lock:
                    candidates = [k for k in cache.ready if not cache.pins.get(k)]
                    full = not cache._free
                    least = min((cache.policy.rank(k) for k in candidates), default=None)
                    before = set(cache.ready)
                pin = rng.random() < 0.3
                fut = cache.load(layer, e, DEMAND if pin else PREFETCH, pin=pin)
                if fut is None:
                    assert full and not candidates  # nothing could be freed
                    continue
                fut.result(timeout=30)
                gone = before - cache.ready
                if full and (layer, e) not in before:
                    assert len(gone) == 1
                    assert cache.policy.rank(gone.pop()) == least
                    evictions += 1
                if pin:
                    cache.unpin(layer, [e])
        finally:
            cache.close()
        assert evictions > 50
    ckpt.close()
