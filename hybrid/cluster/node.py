"""An expert node: join a head, hold this node's share of every MoE layer, answer its requests.

Owns the node's session: open the local checkpoint, full or a share (kimi-hybrid split; validated: a
broken one is reported to the head at join, naming file and tensor), measure and report its figures,
join, build an expert backend that computes only the pairs the head gives this rank, of the experts
the plan has it hold (mmap: only those experts' pages are ever read; cache: only they are loaded),
then serve until the head says stop or goes away. Non-expert tensors are never read.
"""
from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hybrid.checkpoint.reader import Checkpoint, CheckpointError
from hybrid.checkpoint.config import ConfigError
from hybrid.cluster.figures import RAM_SHARE, measure_gbps
from hybrid.cluster.identity import checkpoint_identity
from hybrid.cluster.link import IDLE_S, ClusterError, Group, address_toward, join_store
from hybrid.cluster.plan import ClusterPlan
from hybrid.cluster.rendezvous import Offer, join, read_plan, ready
from hybrid.cluster.share import ShareCheckpoint, is_share
from hybrid.cluster.token import check_token
from hybrid.cluster.wire import (LAYER, OK, PING, REFUSED, REPLY_HEAD, REQ_HEAD, STOP, TAG_PAYLOAD, TAG_REPLY,
                                 TAG_REQUEST, Reply, pack_reply, parse_address, parse_request, payload_nbytes,
                                 payload_views, request_nbytes, reply_sum)
from hybrid.experts.backend import ExpertBackend
from hybrid.experts.build import ExpertOptions, build_backend
from hybrid.experts.cache import expert_span

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class NodeOptions:
    head: str  # 'HOST:PORT' the head listens on
    token: str
    kind: str = "numba"  # 'numba' or 'reference' (no AVX2)
    expert_mode: str = "auto"  # 'mmap', 'ram' (the share copied at load), 'cache' (RAM slots fed from disk) or
    # 'auto' (mmap when the share fits)
    ram_budget: int = 0  # bytes of RAM for this node's experts (0: 80% of ram_bytes)
    cpu_threads: int | None = None
    ram_bytes: int = 0  # what this machine has (reported at join)
    join_timeout_s: float = 600.0
    gbps: float = 0.0  # read bandwidth reported for placement (0: measured at start, cluster.figures)

    def __post_init__(self):
        if self.expert_mode not in ("auto", "mmap", "ram", "cache") or self.kind not in ("numba", "reference"):
            raise ValueError(f"expert_mode {self.expert_mode!r} or kind {self.kind!r} is not known")


def run_node(path, opts: NodeOptions, on_serving: Callable[[str], None] | None = None) -> str:
    """Serve one head session with the checkpoint at path; -> why it ended cleanly ('the head closed the
    session'). on_serving(text): told what this node serves, once its share is loaded. Raises
    ClusterError (refused, head lost), ValueError (options)."""
    host, port = parse_address(opts.head, "--head")
    secret = check_token(opts.token)
    ckpt, identity, problem, holds = None, None, "", None
    try:
        if is_share(path):
            ckpt = ShareCheckpoint(path)
            identity, holds = ckpt.source, ckpt.holds
        else:
            ckpt = Checkpoint(path)
            identity = checkpoint_identity(ckpt)
    except (CheckpointError, ConfigError) as e:  # said to the head at join, then raised here
        problem = f"its checkpoint cannot be used: {e}"
    try:
        gbps = opts.gbps or measure_gbps(opts.cpu_threads)
        store = join_store(host, port, opts.join_timeout_s)
        me = address_toward(host, port)
        offer = Offer(f"{socket.gethostname()} {me}", opts.ram_bytes, opts.cpu_threads or 0, gbps,
                      opts.ram_budget or int(RAM_SHARE * opts.ram_bytes), holds)
        hello, rank = join(store, secret, identity, problem, offer, opts.join_timeout_s)
        log.info("joined %s as node %d of %d; waiting for the plan", opts.head, rank, hello.world - 1)
        plan = _plan(store, rank, ckpt, holds, opts.join_timeout_s)
        eopts = _expert_options(opts, ckpt, plan.held_by(rank))
        try:
            local = build_backend(ckpt, eopts)
        except (CheckpointError, ValueError, OSError, MemoryError) as e:
            ready(store, rank, plan.digest(), f"cannot load its experts: {e}")
            raise ClusterError(f"cannot load this node's experts: {e}") from None
        try:
            ready(store, rank, plan.digest())
            timeout_s = hello.node_timeout_ms / 1000
            group = Group(store, rank, plan.world, me, max(timeout_s, 30.0))
            how = (f"cache mode, RAM for {eopts.cache_slots} of them" if eopts.expert_mode == "cache" else
                   f"{eopts.expert_mode} mode")
            said = (f"node {rank} of {plan.world - 1}: serving {plan.held_of(rank)} routed experts, the first choice "
                    f"for {plan.experts_of(rank)} ({how}{', a share' if holds is not None else ''})")
            log.info("%s for %s", said, opts.head)
            if on_serving is not None:
                on_serving(said)
            cfg = ckpt.config
            nbytes = expert_span(ckpt, cfg.moe_layers[0], 0).length
            return Server(local, group, store, rank, cfg.hidden_size, cfg.num_experts_per_tok, timeout_s, nbytes,
                          eopts.expert_mode == "cache", plan).serve()
        finally:
            local.close()
    finally:
        if ckpt is not None:
            ckpt.close()


def _expert_options(opts: NodeOptions, ckpt: Checkpoint, held: np.ndarray) -> ExpertOptions:
    """mmap when this node's share of routed experts (held: bool [MoE layers, E]) fits its RAM budget, else
    (or when asked) a RAM cache of as many slots as the budget holds, never more than the share; ram (asked
    for): the share copied at load."""
    cfg = ckpt.config
    share = int(held.sum())
    slot = expert_span(ckpt, cfg.moe_layers[0], 0).length
    budget = opts.ram_budget or int(0.8 * opts.ram_bytes)
    mode = opts.expert_mode
    if mode == "auto":
        mode = "mmap" if not budget or share * slot <= budget else "cache"
    slots = max(1, min(share, budget // slot if budget else share))
    if mode == "cache":
        log.info("cache mode: %d slots for %d experts (%.1f GB)", slots, share, slots * slot / 1e9)
    return ExpertOptions(kind=opts.kind, expert_mode=mode, cache_slots=slots if mode == "cache" else 0,
                         cpu_threads=opts.cpu_threads, held=held if mode == "ram" else None)


def _plan(store, rank: int, ckpt: Checkpoint, holds, timeout_s: float) -> ClusterPlan:
    """The head's plan, checked against this checkpoint and, for a share, what its files hold (a misfit
    is said to the head and raised)."""
    world, owner, holders = read_plan(store, timeout_s)
    cfg = ckpt.config
    want = (len(cfg.moe_layers), cfg.n_routed_experts)
    problem = ""
    if owner.shape != want:
        problem = f"the plan covers {list(owner.shape)} experts; its checkpoint {list(want)}"
    else:
        try:
            plan = ClusterPlan(world, tuple(cfg.moe_layers), owner, holders)
        except ValueError as e:
            problem = str(e)
        else:
            if holds is not None and (plan.held_by(rank) & ~holds).any():
                problem = "the plan gives it experts its share does not hold (another kimi-hybrid split?)"
    if problem:
        ready(store, rank, b"", problem)
        raise ClusterError(f"the head's plan does not fit this node: {problem}")
    return plan


class Server:
    """The request loop of one session: each LAYER request's pairs assigned to this rank, summed."""

    def __init__(self, local: ExpertBackend, group: Group, store, rank: int, hidden: int, top_k: int,
                 timeout_s: float, expert_nbytes: int = 0, disk: bool = False, plan: ClusterPlan | None = None):
        """expert_nbytes: one routed expert's bytes; disk: the backend reads experts from disk (cache mode),
        so each reply asks its statistics for the bytes read (not in mmap mode: a cost per layer).
        plan: what this rank holds; a request for another expert is refused (None: any)."""
        self.local, self.group, self.store, self.rank = local, group, store, rank
        self.held = plan.held_by(rank) if plan is not None else None
        self.row = plan.row if plan is not None else {}
        self.hidden, self.top_k, self.timeout_s = hidden, top_k, timeout_s
        self.expert_nbytes, self.disk = expert_nbytes, disk
        self.last_seq = 0

    def serve(self) -> str:
        req = np.empty(request_nbytes(self.top_k, self.hidden), np.uint8)
        try:
            while True:
                why = Group.wait(self.group.recv(req, 0, TAG_REQUEST), time.monotonic() + IDLE_S)
                if why is not None:
                    raise ClusterError(f"the head {why}; this node's session is over. Start it again to join the "
                                       "head's next session")
                r, K, D = parse_request(req)
                if r.seq <= self.last_seq:
                    raise ClusterError(f"request {r.seq} after {self.last_seq}: out of step with the head")
                self.last_seq = r.seq
                if r.cmd == STOP:
                    return "the head closed the session"
                if r.cmd == PING:
                    self._reply(np.zeros(REPLY_HEAD, np.uint8), Reply(r.seq, OK, 0, 0.0))
                elif r.cmd == LAYER:
                    self._layer(req, r.layer, r.tokens, K, D, r.seq)
        finally:
            self.group.close()

    def _layer(self, req: np.ndarray, layer: int, T: int, K: int, D: int, seq: int) -> None:
        if D != self.hidden or K != self.top_k:
            raise ClusterError(f"the head sent hidden size {D}, top-k {K}; this checkpoint has {self.hidden}, "
                               f"{self.top_k}")
        body = req[REQ_HEAD:]
        if T > 1:
            body = np.empty(payload_nbytes(T, K, D), np.uint8)
            why = Group.wait(self.group.recv(body, 0, TAG_PAYLOAD), time.monotonic() + self.timeout_s)
            if why is not None:
                raise ClusterError(f"the head {why} in the middle of a request")
        x, w, ids, who = payload_views(body, T, K, D)
        idn = ids.astype(np.int64)
        mine = who == self.rank
        wn = np.where(mine, w, 0.0).astype(np.float32)
        if self.held is not None and not self.held[self.row[layer]][idn[mine]].all():
            e = int(idn[mine][~self.held[self.row[layer]][idn[mine]]][0])
            self.store.set(f"khc/error/{self.rank}", f"asked for expert {layer}.{e}, which it does not hold".encode())
            self._reply(np.zeros(REPLY_HEAD + T * D * 4, np.uint8), Reply(seq, REFUSED, 0, 0.0))
            raise ClusterError(f"the head asked for expert {layer}.{e}, which this node does not hold (out of step "
                               "with the plan)")
        out = np.empty(REPLY_HEAD + T * D * 4, np.uint8)
        y = reply_sum(out, T, D)
        disk0 = self.local.stats()["bytes_read"] if self.disk else 0
        t0 = time.perf_counter()
        try:
            xt = torch.from_numpy(x)
            h = self.local.submit_host(layer, xt, torch.from_numpy(idn), torch.from_numpy(wn), x, idn, wn)
            y_dev = self.local.wait_host(h, y)
            if y_dev is not None:
                y += y_dev.float().cpu().numpy()
        except Exception as e:  # tell the head why, then stop serving
            self.store.set(f"khc/error/{self.rank}", f"{type(e).__name__}: {e}".encode())
            self._reply(out, Reply(seq, REFUSED, 0, 0.0))
            raise
        compute_s = time.perf_counter() - t0
        disk = self.local.stats()["bytes_read"] - disk0 if self.disk else 0
        experts = len(np.unique(idn[wn != 0]))
        self._reply(out, Reply(seq, OK, experts, compute_s, experts * self.expert_nbytes, int(disk)))

    def _reply(self, out: np.ndarray, r: Reply) -> None:
        pack_reply(out, r)
        why = Group.wait(self.group.send(out, 0, TAG_REPLY), time.monotonic() + self.timeout_s)
        if why is not None:
            raise ClusterError(f"the head {why} while this node answered")
