"""ClusterExperts: the head's expert backend when other machines hold part of every MoE layer.

Owns one layer call across the cluster: give each (token, expert) pair to a rank that holds the expert
(choose.py picks among replicas; the head's hot experts stay on the head), send each node that has pairs one request
(the layer's input, ids, weights and the assignment), compute the head's own share on its local
backend meanwhile, then add the nodes' weighted sums. Per layer: one request (plus one payload for a
multi-token call) and one reply per node, no per-expert traffic.

Faults: a node that dies, stalls past the timeout or fails makes wait() raise NodeLost (the request in
flight fails; the engine's KV cache only advances after a whole forward). From then on the head
computes every expert itself from its own copy of the checkpoint: slower, same tokens.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from hybrid.cluster.link import ClusterError, Group, NodeLost, first_line
from hybrid.cluster.choose import Chooser
from hybrid.cluster.plan import ClusterPlan
from hybrid.cluster.rendezvous import Member
from hybrid.cluster.wire import (LAYER, OK, REPLY_HEAD, STOP, TAG_PAYLOAD, TAG_REPLY, TAG_REQUEST, pack_request,
                                 parse_reply, payload_nbytes, reply_sum, request_nbytes)
from hybrid.experts.backend import ExpertBackend, Handle, HotSet

log = logging.getLogger(__name__)

@dataclass
class NodeStats:
    rank: int
    name: str
    state: str = "serving"  # or "lost: why"
    requests: int = 0  # layer calls it computed
    experts: int = 0  # distinct experts per layer call, summed
    compute_s: float = 0.0  # its own time computing them
    expert_bytes: int = 0  # routed-expert bytes its kernels read
    disk_bytes: int = 0  # of those, read from its disk (cache mode)
    wait_s: float = 0.0  # the head blocked on its replies (after its own share and the nodes before it)
    network_s: float = 0.0  # of wait_s, the part after it must have finished computing (the network, messaging)


@dataclass
class Pending:
    """One layer call in flight on the nodes."""

    seq: int
    tokens: int
    sends: list = field(default_factory=list)  # (rank, work)
    recvs: dict = field(default_factory=dict)  # rank -> (work, reply buffer)
    sent_at: float = 0.0
    bufs: tuple = ()  # the request and payload buffers, alive until their sends complete


class ClusterExperts(ExpertBackend):
    """local: the head's own backend (it computes the pairs assigned to rank 0, and everything once
    the nodes are lost); group, store, members: the admitted cluster (cluster.head.connect)."""

    def __init__(self, local: ExpertBackend, plan: ClusterPlan, chooser: Chooser, group: Group, store: dist.Store,
                 members: list[Member], hidden: int, top_k: int, timeout_s: float):
        self.local, self.plan, self.choose, self.group, self.store = local, plan, chooser, group, store
        self.hidden, self.top_k, self.timeout_s = hidden, top_k, timeout_s
        self.members = {m.rank: m for m in members}
        self._row = plan.row
        self._seq = 0
        self.lost: str | None = None  # why the head now computes everything itself
        self.node_stats = {r: NodeStats(r, m.name) for r, m in self.members.items()}
        self.reset_stats()

    # ---- the seam ---------------------------------------------------------------------------
    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Handle:
        xn = np.ascontiguousarray(x.detach().float().cpu().numpy())
        idn = ids.cpu().numpy().astype(np.int64)
        wn = np.ascontiguousarray(weights.detach().float().cpu().numpy())
        pending, wl = self._send(layer, xn, idn, wn)
        if pending is None:
            return self.local.submit(layer, x, ids, weights), None
        return self.local.submit(layer, x, ids, torch.from_numpy(wl).to(weights.device, weights.dtype)), pending

    def submit_host(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    xn: np.ndarray, idn: np.ndarray, wn: np.ndarray, device_hot: bool = False,
                    predicted: np.ndarray | None = None) -> Handle:
        # the head's hot pairs are all its own (assign), so `weights` still holds their true values
        pending, wl = self._send(layer, xn, idn, wn)
        return self.local.submit_host(layer, x, ids, weights, xn, idn, wl, device_hot, predicted), pending

    def wait(self, handle: Handle) -> torch.Tensor:
        local, pending = handle
        y = self.local.wait(local)
        if pending is None:
            return y
        return y + torch.from_numpy(self._collect(pending)).to(y.device)

    def wait_host(self, handle: Handle, out: np.ndarray) -> torch.Tensor | None:
        local, pending = handle
        y_dev = self.local.wait_host(local, out)
        if pending is not None:
            out += self._collect(pending)
        return y_dev

    def close(self) -> None:
        if self.group is not None:  # tell the nodes the session is over, then drop the connections
            self._seq += 1
            req = np.zeros(request_nbytes(self.top_k, self.hidden), np.uint8)
            pack_request(req, STOP, 0, self._seq)
            deadline = time.monotonic() + min(self.timeout_s, 5.0)
            for work in [self.group.send(req, r, TAG_REQUEST) for r in self.members]:
                Group.wait(work, deadline)
            self.group.close()
            self.group = None
        self.store = None
        self.local.close()

    # ---- the nodes ----------------------------------------------------------------------------
    def _send(self, layer: int, xn: np.ndarray, idn: np.ndarray, wn: np.ndarray
              ) -> tuple[Pending | None, np.ndarray]:
        """Send each node with pairs its request -> (what is in flight, or None; the head's weights)."""
        if self.group is None:
            return None, wn
        T, D = xn.shape
        who = self.choose(self._row[layer], idn, wn, frozenset(self.local.hot.get(layer, ())))
        ranks = sorted(set(np.unique(who).tolist()) - {0})
        if not ranks:
            return None, wn
        self._seq += 1
        req = np.empty(request_nbytes(idn.shape[1], D), np.uint8)
        payload = np.empty(payload_nbytes(T, idn.shape[1], D), np.uint8) if T > 1 else None
        p = Pending(self._seq, T, sent_at=time.perf_counter(), bufs=(req, payload))
        pack_request(req, LAYER, layer, p.seq, xn, idn, wn, who, payload)
        try:
            for r in ranks:
                p.sends.append((r, self.group.send(req, r, TAG_REQUEST)))
                if payload is not None:
                    p.sends.append((r, self.group.send(payload, r, TAG_PAYLOAD)))
                buf = np.empty(REPLY_HEAD + T * D * 4, np.uint8)
                p.recvs[r] = (self.group.recv(buf, r, TAG_REPLY), buf)
        except (RuntimeError, dist.DistError) as e:
            self._lose(r, f"went away ({first_line(e)})")
        return p, np.where(who == 0, wn, 0.0).astype(np.float32)

    def _collect(self, p: Pending) -> np.ndarray:
        """The nodes' weighted sums for p, added up: fp32 [T, D]. NodeLost when one fails."""
        if self.group is None:
            raise ClusterError(f"this request's layer was sent to nodes that are now lost ({self.lost})")
        t_wait = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        for r, work in p.sends:
            why = Group.wait(work, deadline)
            if why is not None:
                self._lose(r, why)
        total = np.zeros((p.tokens, self.hidden), np.float32)
        slowest = 0.0
        for r, (work, buf) in p.recvs.items():
            t0 = time.perf_counter()
            why = Group.wait(work, deadline)
            if why is not None:
                self._lose(r, why)
            seen = time.perf_counter()
            reply = parse_reply(buf)
            if reply.status != OK:
                self._lose(r, f"failed: {self._error_text(r)}")
            if reply.seq != p.seq:
                self._lose(r, f"answered request {reply.seq} instead of {p.seq} (out of step)")
            total += reply_sum(buf, p.tokens, self.hidden)
            st = self.node_stats[r]
            st.requests, st.experts, st.compute_s = st.requests + 1, st.experts + reply.experts, \
                st.compute_s + reply.compute_s
            st.expert_bytes, st.disk_bytes = st.expert_bytes + reply.expert_bytes, st.disk_bytes + reply.disk_bytes
            st.wait_s += seen - t0
            st.network_s += max(0.0, seen - max(t0, p.sent_at + reply.compute_s))
            slowest = max(slowest, reply.compute_s)
        done = time.perf_counter()
        self.wait_s += done - t_wait
        # what the layer took beyond the slowest rank's own expert time (the head's share ends at t_wait)
        self.overhead_s += max(0.0, (done - p.sent_at) - max(slowest, t_wait - p.sent_at))
        self.layer_calls += 1
        return total

    def _error_text(self, rank: int) -> str:
        key = f"khc/error/{rank}"
        try:
            if self.store is not None and self.store.check([key]):
                return self.store.get(key).decode("utf-8", "replace")[:2000]
        except (RuntimeError, dist.DistError):
            pass
        return "see the node's log"

    def _lose(self, rank: int, why: str) -> None:
        """Give the nodes up: from now on the head computes every expert itself. Raises NodeLost."""
        name = self.members[rank].name if rank in self.members else "?"
        self.lost = f"node {rank} ({name}) {why}"
        for st in self.node_stats.values():
            st.state = f"lost: {why}" if st.rank == rank else "dropped (the cluster broke up)"
        if self.group is not None:
            self.group.close()
            self.group = None
        log.error("cluster: %s; the head computes every expert itself from now on. To use the nodes again, "
                  "restart them and then the head", self.lost)
        raise NodeLost(rank, name, f"{why}. This request failed; the head computes every expert itself from now on "
                       "(slower, same answers). Restart the nodes and then the head to use them again")

    # ---- the interface's features: the head's local backend's ---------------------------------
    @property
    def host_hops(self) -> bool:
        return self.local.host_hops

    @property
    def prefetch_width(self) -> int:
        return self.local.prefetch_width

    @property
    def next_layer(self) -> Mapping[int, int]:
        return self.local.next_layer

    def predict(self, layer: int, x: torch.Tensor, width: int) -> torch.Tensor:
        return self.local.predict(layer, x, width)

    @property
    def hot(self) -> Mapping[int, HotSet]:
        return self.local.hot

    @property
    def hot_capacity(self) -> int:
        return self.local.hot_capacity

    @property
    def fused_hot(self) -> bool | None:
        return self.local.fused_hot

    def set_hot(self, layer: int, hot: HotSet) -> None:
        self.local.set_hot(layer, hot)

    def refresh_hot(self) -> None:
        self.local.refresh_hot()

    @property
    def route_counts(self) -> Mapping[int, np.ndarray]:
        return self.local.route_counts

    # ---- statistics -------------------------------------------------------------------------
    def stats(self) -> dict:
        """The head's own figures (its local backend's), plus 'cluster': per node its state, layer calls,
        experts, compute time, bytes read (its kernels', its disk's), the head's wait on it and the part of
        that wait after it must have finished computing (network_s); wait_s (the head blocked on nodes
        after its own share), overhead_s (per layer, the time beyond the slowest rank's own expert time,
        summed), layer_calls; experts_per_rank (each rank's first-choice experts), held_per_rank (with
        its replicas), gbps_per_rank (what placement used) and balance (choose.Chooser.stats: how
        uneven the layer calls left the ranks)."""
        out = dict(self.local.stats())
        world = range(self.plan.world)
        out["cluster"] = {
            "world": self.plan.world, "lost": self.lost, "layer_calls": self.layer_calls, "wait_s": self.wait_s,
            "overhead_s": self.overhead_s,
            "nodes": [vars(s).copy() for s in self.node_stats.values()],
            "experts_per_rank": [self.plan.experts_of(r) for r in world],
            "held_per_rank": [self.plan.held_of(r) for r in world],
            "gbps_per_rank": [float(g) for g in self.choose.speeds],
            "balance": self.choose.stats(),
        }
        return out

    def reset_stats(self) -> None:
        self.local.reset_stats()
        self.choose.reset_stats()
        self.wait_s = self.overhead_s = 0.0
        self.layer_calls = 0
        for st in self.node_stats.values():  # the state stays: a lost node stays lost
            st.requests = st.experts = st.expert_bytes = st.disk_bytes = 0
            st.compute_s = st.wait_s = st.network_s = 0.0
