"""Joining: the handshake through the head's TCP store, before any expert work.

Head: publish a hello (protocol version, session nonce, checkpoint identity), admit each node (token
proof checked in constant time, identity compared), publish the plan, wait until every node has built
its share. Node: read the hello, take a rank, send its join, check the head's verdict and proof, read
the plan. Any mismatch is refused on both sides with a message saying what differs. Keys are raw bytes
in wire.py's formats; the store's own protocol carries them.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass

import numpy as np
import torch.distributed as dist

from hybrid.cluster.identity import difference
from hybrid.cluster.link import ClusterError, first_line, seconds
from hybrid.cluster.wire import (HOLDS_SHARE, OK, REFUSED, Hello, Identity, Join, Verdict, WireError, pack_hello,
                                 pack_holds, pack_join, pack_plan, pack_ready, pack_verdict, parse_hello, parse_holds,
                                 parse_join, parse_plan, parse_ready, parse_verdict)

log = logging.getLogger(__name__)

K_HELLO, K_RANKS, K_PLAN = "khc/hello", "khc/ranks", "khc/plan"
SEEN_S = 5.0  # how long a head that refused a node waits for it to read why


def proof(token: bytes, *parts: bytes) -> bytes:
    return hmac.new(token, b"".join(parts), hashlib.sha256).digest()


@dataclass(frozen=True)
class Member:
    """An admitted node, as the head knows it."""

    rank: int
    name: str  # host and address, as the node described itself
    ram_bytes: int
    cpu_threads: int
    gbps: float = 0.0  # its measured read bandwidth
    budget_bytes: int = 0  # the RAM it gives its experts
    holds: np.ndarray | None = None  # bool [moe layers, E] for a share node (kimi-hybrid split), else None


def _get(store: dist.Store, key: str, deadline: float, waiting_for: str) -> bytes:
    try:
        store.wait([key], seconds(max(deadline - time.monotonic(), 0.001)))
        return store.get(key)
    except (RuntimeError, dist.DistError) as e:
        if "timeout" in str(e).lower() or time.monotonic() >= deadline:
            raise ClusterError(f"gave up waiting for {waiting_for}") from None
        raise ClusterError(f"the cluster's store failed while waiting for {waiting_for} ({first_line(e)})") from None


# ---- head -----------------------------------------------------------------------------------------
def admit(store: dist.Store, token: bytes, world: int, identity: Identity, node_timeout_s: float,
          join_timeout_s: float, where: str) -> list[Member]:
    """Publish the hello and admit world - 1 nodes; a refusal raises ClusterError naming the node
    and what differs (the node is told the same)."""
    nonce = secrets.token_bytes(16)
    store.set(K_HELLO, pack_hello(Hello(world, int(node_timeout_s * 1000), nonce, identity)))
    deadline = time.monotonic() + join_timeout_s
    members = []
    for rank in range(1, world):
        start = (f"start `kimi-hybrid node --head {where} --model PATH --token SECRET` on each of the {world - 1} "
                 "nodes")
        raw = _get(store, f"khc/join/{rank}", deadline, f"node {rank} of {world - 1} to join within "
                   f"{join_timeout_s:.0f} s ({len(members)} joined); {start}")
        try:
            j = parse_join(raw)
        except WireError as e:
            _refuse(store, rank, str(e))
            raise ClusterError(f"node {rank} was refused: {e}") from None
        problem = (j.text or "refused") if j.status != OK else None
        if problem is None and not hmac.compare_digest(j.proof, proof(token, b"join", nonce, bytes([rank]))):
            problem = "wrong token: its --token (or KIMI_HYBRID_CLUSTER_TOKEN) differs from the head's"
        if problem is None:
            problem = difference(identity, j.identity)
        name = j.text if j.status == OK else "?"
        holds = None
        if problem is None and j.flags & HOLDS_SHARE:
            try:
                holds = parse_holds(_get(store, f"khc/holds/{rank}", deadline, f"node {rank}'s holdings"))
            except WireError as e:
                problem = str(e)
        if problem is not None:
            _refuse(store, rank, problem)
            raise ClusterError(f"node {rank} ({name}) was refused: {problem}")
        store.set(f"khc/verdict/{rank}", pack_verdict(Verdict(rank, proof(token, b"head", j.nonce), "")))
        members.append(Member(rank, name, j.ram_bytes, j.cpu_threads, j.gbps, j.budget_bytes, holds))
        log.info("cluster: node %d (%s) joined: %.1f GB/s, %.1f GB for experts%s", rank, name, j.gbps,
                 j.budget_bytes / 1e9, "" if holds is None else f", a share of {int(holds.sum())} experts")
    return members


def _refuse(store: dist.Store, rank: int, why: str) -> None:
    """Tell the node why, and give it a moment to read that before the head closes the store."""
    store.set(f"khc/verdict/{rank}", pack_verdict(Verdict(-1, bytes(32), why)))
    try:
        _get(store, f"khc/seen/{rank}", time.monotonic() + SEEN_S, "the node to read its refusal")
    except ClusterError:
        pass


def publish_plan(store: dist.Store, world: int, owner, holders, plan_hash: bytes, members: list[Member],
                 timeout_s: float) -> None:
    """Publish the plan and wait until every node has built its share of it (or said why it cannot)."""
    store.set(K_PLAN, pack_plan(world, owner, holders))
    deadline = time.monotonic() + timeout_s
    for m in members:
        got, problem = parse_ready(_get(store, f"khc/ready/{m.rank}", deadline,
                                        f"node {m.rank} ({m.name}) to load its experts within {timeout_s:.0f} s"))
        if problem:
            raise ClusterError(f"node {m.rank} ({m.name}) cannot serve its share: {problem}")
        if got != plan_hash:
            raise ClusterError(f"node {m.rank} ({m.name}) built its share from another plan; restart it")


# ---- node -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Offer:
    """What a node tells the head at join besides its identity: its name, machine and placement figures."""

    name: str
    ram_bytes: int
    cpu_threads: int
    gbps: float
    budget_bytes: int
    holds: np.ndarray | None = None  # bool [moe layers, E]: a share node's experts (kimi-hybrid split)


def join(store: dist.Store, token: bytes, identity: Identity | None, problem: str, offer: Offer,
         timeout_s: float) -> tuple[Hello, int]:
    """Join the head's session -> (its hello, this node's rank). identity None with `problem`: the node
    cannot serve (its checkpoint is broken) and says so to the head before giving up."""
    deadline = time.monotonic() + timeout_s
    raw = _get(store, K_HELLO, deadline, "the head's hello")
    rank = store.add(K_RANKS, 1)
    try:
        hello = parse_hello(raw)
    except WireError as e:  # tell the head too, in our own version's format
        problem = problem or str(e).replace("this side", "the node")
        hello = None
    nonce = secrets.token_bytes(16)
    if hello is not None and rank >= hello.world:
        raise ClusterError(f"the head expects {hello.world - 1} nodes and all have joined; stop the extra node")
    status = REFUSED if problem or identity is None else OK
    ident = identity or Identity(bytes(32), bytes(32), bytes(32))
    p = proof(token, b"join", hello.nonce, bytes([rank])) if hello is not None else bytes(32)
    if offer.holds is not None and status == OK:  # before the join: the head reads it once the join is there
        store.set(f"khc/holds/{rank}", pack_holds(offer.holds))
    store.set(f"khc/join/{rank}", pack_join(Join(status, nonce, ident, p, offer.ram_bytes, offer.cpu_threads,
                                                 problem if status != OK else offer.name, offer.gbps,
                                                 offer.budget_bytes, HOLDS_SHARE if offer.holds is not None else 0)))
    if status != OK:
        raise ClusterError(f"refused to join: {problem}")
    verdict = parse_verdict(_get(store, f"khc/verdict/{rank}", deadline, "the head's verdict"))
    store.set(f"khc/seen/{rank}", b"1")
    if verdict.rank < 0:
        raise ClusterError(f"the head refused this node: {verdict.text}")
    if verdict.rank != rank or not hmac.compare_digest(verdict.proof, proof(token, b"head", nonce)):
        raise ClusterError("the head could not prove it knows the token; is another program listening at that "
                           "address?")
    return hello, rank


def read_plan(store: dist.Store, timeout_s: float) -> tuple[int, np.ndarray, np.ndarray]:
    """-> (world, owner uint8 [moe layers, E], holders uint64 [moe layers, E]) once the head has admitted
    every node."""
    return parse_plan(_get(store, K_PLAN, time.monotonic() + timeout_s, "the head's plan (the other nodes to join)"))


def ready(store: dist.Store, rank: int, plan_hash: bytes, problem: str = "") -> None:
    store.set(f"khc/ready/{rank}", pack_ready(plan_hash, problem))
