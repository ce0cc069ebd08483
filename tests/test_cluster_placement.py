"""Placement and replication across a cluster (hybrid.cluster.plan, choose): shares in proportion to the
bandwidth each rank reports, capped by its RAM; a share node keeps what its files hold; replicas of the
most-routed experts in spare RAM; per call, the replicas spread the work.

Invariants: shares follow the reported figures (checked against the arithmetic written out here);
every expert has exactly one first choice and its owner holds it; with every expert everywhere each
call's busiest rank has ceil(experts / ranks); the choice never leaves a call more uneven than the
owners alone, and stays within one expert of the exhaustive optimum. On loopback with unequal
reported figures, the plan follows them and the tokens stay the single process's.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import hybrid
from hybrid.cluster import wire
from hybrid.cluster.choose import Chooser
from hybrid.cluster.plan import ClusterPlan, RankFigures, place, shares, split
from hybrid.experts.cache import expert_span
from kernels_cpu.simd import host_has_avx2
from tests.test_cluster import N_NEW, PROMPT, WAIT_S, free_port, head, nodes, output

L3, E = [1, 2, 3], 384


def test_shares_follow_bandwidth_and_are_capped_by_ram():
    total = 3 * E
    fast, slow, small = RankFigures(10.0), RankFigures(5.0), RankFigures(5.0, budget_bytes=50_000)
    got = shares(total, [fast, slow, small], expert_bytes=1000)  # small holds 50 experts
    assert got[2] == pytest.approx(50) and got[0] == pytest.approx(2 * got[1]) and got.sum() == pytest.approx(total)
    # all the budgets together hold less than every expert: in proportion to the budgets
    tight = [RankFigures(10.0, 300_000), RankFigures(1.0, 100_000)]
    assert list(shares(total, tight, 1000)) == pytest.approx([0.75 * total, 0.25 * total])


def test_place_deals_first_choices_by_the_figures_and_fills_spare_ram_with_the_hottest():
    rng = np.random.default_rng(0)
    hot = {layer: rng.random(E) for layer in L3}
    ranks = [RankFigures(10.0), RankFigures(5.0, budget_bytes=500_000), RankFigures(5.0, budget_bytes=50_000)]
    plan = place(L3, E, ranks, 1000, hot)
    want = shares(3 * E, ranks, 1000)  # 734.7, 367.3, 50
    got = np.array([plan.experts_of(r) for r in range(3)])
    assert got.sum() == 3 * E and np.abs(got - want).max() <= len(L3)
    assert plan.held_of(0) == 3 * E  # the head: no budget given, every expert
    assert plan.held_of(2) == plan.experts_of(2)  # no spare RAM, no replicas
    per_layer = (500 - plan.experts_of(1)) // len(L3)
    for i, layer in enumerate(L3):  # node 1's replicas: the hottest of the experts it is not first choice for
        mine, reps = plan.owner[i] == 1, plan.held_by(1)[i] & (plan.owner[i] != 1)
        others = np.flatnonzero(~mine)
        assert reps.sum() == per_layer
        assert set(np.flatnonzero(reps)) == set(others[np.argsort(-hot[layer][others])][:per_layer])


def test_a_share_node_keeps_what_its_files_hold():
    holds = split(L3, E, [1.0, 1.0]).owner == 1  # a share cut for rank 1 of 2
    plan = place(L3, E, [RankFigures(10.0), RankFigures(1.0, 10**12, holds)], 1000)
    assert (plan.owner == 1).sum() == holds.sum() and ((plan.owner == 1) == holds).all()
    assert not (plan.held_by(1) & ~holds).any()  # nothing it lacks, however much RAM it has
    with pytest.raises(ValueError, match="owner must hold it"):
        ClusterPlan(2, tuple(L3), plan.owner, np.ones_like(plan.holders))


def _primary_loads(plan, row, es, cost):
    return np.bincount(plan.owner[row][es], minlength=plan.world) * cost


def test_replicas_spread_each_call_as_evenly_as_whole_experts_allow():
    world, rng = 3, np.random.default_rng(1)
    owner = split(L3, E, [1.0] * world).owner
    everywhere = ClusterPlan(world, tuple(L3), owner, np.full(owner.shape, 2**world - 1, np.uint64))
    ch = Chooser(everywhere, [1.0] * world)
    for _ in range(200):
        ids = rng.permutation(E)[:8][None, :]
        who = ch(0, ids, np.ones((1, 8), np.float32))
        assert np.bincount(who[0], minlength=world).max() == 3  # ceil(8 / 3)
    s = ch.stats()
    assert s["layer_calls"] == 200 and s["work_max_over_mean"] == pytest.approx(3 / (8 / 3))
    assert s["load_max_over_ideal_owners_only"] > s["load_max_over_ideal"]


def test_the_choice_is_never_worse_than_the_owners_and_near_the_optimum():
    world, rng = 3, np.random.default_rng(2)
    owner = split(L3, 24, [1.0] * world).owner
    holders = np.left_shift(np.uint64(1), owner.astype(np.uint64))
    holders |= (rng.random(owner.shape) < 0.4).astype(np.uint64) << np.uint64(rng.integers(0, world))
    plan = ClusterPlan(world, tuple(L3), owner, holders)
    speeds = [2.0, 1.0, 1.0]
    ch = Chooser(plan, speeds)
    cost = np.mean(speeds) / np.array(speeds)
    for _ in range(60):
        ids = rng.permutation(24)[:6][None, :]
        who = ch(1, ids, np.ones((1, 6), np.float32))
        es = ids[0]
        assert all(int(plan.holders[1, e]) >> int(r) & 1 for e, r in zip(es, who[0]))  # only holders compute
        got = (np.bincount(who[0], minlength=world) * cost).max()
        options = [[r for r in range(world) if int(plan.holders[1, e]) >> r & 1] for e in es]
        best = min((np.bincount(c, minlength=world) * cost).max() for c in itertools.product(*options))
        assert got <= _primary_loads(plan, 1, es, cost).max() + 1e-9
        assert got <= best + cost.max() + 1e-9


def test_a_dropped_pair_and_the_heads_hot_experts_need_no_node():
    plan = split(L3, 16, [1.0, 1.0])
    ch = Chooser(plan, [1.0, 1.0])
    node_experts = [e for e in range(16) if plan.owner[0, e] == 1][:2]
    rest = [e for e in range(16) if e not in node_experts][-2:]
    ids = np.array([node_experts + rest])
    who = ch(0, ids, np.array([[0.0, 1.0, 1.0, 1.0]], np.float32), frozenset({node_experts[1]}))
    assert who[0, 0] == 0 and who[0, 1] == 0  # dropped; the head's hot expert
    assert list(who[0, 2:]) == list(plan.owner[0, rest])


def test_the_join_carries_the_figures_and_the_plan_its_replicas():
    ident = wire.Identity(b"c" * 32, b"i" * 32, b"d" * 32)
    j = wire.Join(wire.OK, b"m" * 16, ident, b"p" * 32, 2**40, 16, "host", 12.5, 3 << 30, wire.HOLDS_SHARE)
    assert wire.parse_join(wire.pack_join(j)) == j
    holds = np.random.default_rng(3).random((3, 384)) < 0.3
    assert (wire.parse_holds(wire.pack_holds(holds)) == holds).all()
    plan = place(L3, E, [RankFigures(1.0), RankFigures(1.0, 10**9)], 1000)
    world, owner, holders = wire.parse_plan(wire.pack_plan(plan.world, plan.owner, plan.holders))
    assert ClusterPlan(world, tuple(L3), owner, holders).digest() == plan.digest()
    bad = bytearray(wire.pack_join(j))
    bad[wire._JOIN.size - 18:wire._JOIN.size - 10] = np.float64(np.nan).tobytes()  # gbps, before budget and flags
    with pytest.raises(wire.WireError, match="not a measurement"):
        wire.parse_join(bytes(bad))


@pytest.mark.skipif(not host_has_avx2(), reason="the Numba INT4 kernels need AVX2 + FMA")
def test_unequal_reported_figures_shape_the_plan_and_not_the_tokens(tiny_path):
    """Node 1 reports the fastest RAM but room for 3 experts; node 2 a third of node 1's speed and room
    for all: node 1 gets what its RAM holds, node 2 its speed's share of the rest."""
    with hybrid.load(tiny_path, backend="numba", expert_mode="mmap") as e:
        tokens = [s.token for s in e.generate(PROMPT, N_NEW, temperature=0)]
        span = expert_span(e.checkpoint, e.checkpoint.config.moe_layers[0], 0).length
    port = free_port()
    extra = {0: ["--mem-gbps", "300", "--ram-budget", "0.0001"], 1: ["--mem-gbps", "100"]}
    with nodes(tiny_path, 2, port, extra=extra) as (procs, logs):
        with head(tiny_path, 3, port) as e:
            assert [s.token for s in e.generate(PROMPT, N_NEW, temperature=0)] == tokens
            st = e.stats()["cluster"]
        for p, log in zip(procs, logs):
            assert p.wait(timeout=WAIT_S) == 0, output(log)
    g = st["gbps_per_rank"]
    assert sorted(g[1:]) == [100.0, 300.0]  # ranks follow the order the nodes joined in
    fast, slow = (1, 2) if g[1] == 300.0 else (2, 1)
    room = 100_000 // span  # what the fast node's --ram-budget holds
    got = st["experts_per_rank"]
    want_slow = (32 - room) * 100 / (100 + g[0])
    assert abs(got[fast] - room) <= 1 and st["held_per_rank"][fast] <= room + 1  # capped by its RAM: no replicas
    assert abs(got[slow] - want_slow) <= 2 and sum(got) == 32
