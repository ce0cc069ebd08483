"""connect: the head's side of forming a cluster, from its local expert backend to a ClusterExperts.

Owns the order: check the options, fingerprint the checkpoint, listen on the named interface, admit
the nodes, place the experts by what every rank reported (plan.place: bandwidth, RAM, a share node's
files; replicas of the most-routed), wait for every node to load its share, open the gloo connections.
A failure at any step closes what was opened and raises (ClusterError, ValueError), leaving the
local backend to the caller.
"""
from __future__ import annotations

import logging
import os

from hybrid.checkpoint.reader import Checkpoint
from hybrid.cluster.backend import ClusterExperts
from hybrid.cluster.choose import Chooser
from hybrid.cluster.figures import head_budget, measure_gbps
from hybrid.cluster.identity import checkpoint_identity
from hybrid.cluster.link import Group, serve_store
from hybrid.cluster.plan import ClusterPlan, RankFigures, place
from hybrid.cluster.rendezvous import admit, publish_plan
from hybrid.cluster.token import TOKEN_ENV, check_token
from hybrid.cluster.wire import is_wildcard, parse_address
from hybrid.experts.backend import ExpertBackend
from hybrid.experts.cache import expert_span

log = logging.getLogger(__name__)

SETUP_MIN_S = 30.0  # at least this long for the gloo connections to come up


def connect(ckpt: Checkpoint, local: ExpertBackend, nodes: int, listen: str, token: str | None = None,
            node_timeout_s: float = 60.0, join_timeout_s: float = 600.0, listen_any: bool = False,
            head_gbps: float | None = None, head_budget_bytes: int | None = None) -> ClusterExperts:
    """Wait for nodes - 1 expert nodes to join at `listen` ('HOST:PORT'), then return the backend that
    splits every MoE layer's experts between this head (rank 0, computing on `local`) and them.
    token: the shared secret (None: $KIMI_HYBRID_CLUSTER_TOKEN). head_gbps, head_budget_bytes: this
    machine's figures for placement (None: measured here, cluster.figures)."""
    host, port = parse_address(listen)
    secret = check_token(token if token is not None else os.environ.get(TOKEN_ENV))
    cfg = ckpt.config
    identity = checkpoint_identity(ckpt)
    me = RankFigures(head_gbps if head_gbps is not None else measure_gbps(),
                     head_budget_bytes if head_budget_bytes is not None else head_budget(ckpt))
    store = serve_store(host, port, listen_any, join_timeout_s)
    log.info("cluster: waiting at %s for %d node(s)", listen, nodes - 1)
    try:
        where = f"THIS_MACHINE:{port}" if is_wildcard(host) else listen  # what a node passes as --head
        members = admit(store, secret, nodes, identity, node_timeout_s, join_timeout_s, where)
        plan = _place(ckpt, local, me, members)
        publish_plan(store, nodes, plan.owner, plan.holders, plan.digest(), members, join_timeout_s)
        group = Group(store, 0, nodes, None if is_wildcard(host) else host, max(node_timeout_s, SETUP_MIN_S))
    except BaseException as e:
        # the traceback's frames hold the store: drop them, so the store closes now and waiting nodes see
        # the head leave instead of waiting out their timeout
        e.__traceback__ = None
        del store
        raise
    log.info("cluster: %d ranks serving; each the first choice for %s routed experts, holding %s", nodes,
             ", ".join(str(plan.experts_of(r)) for r in range(nodes)),
             ", ".join(str(plan.held_of(r)) for r in range(nodes)))
    chooser = Chooser(plan, [me.gbps] + [m.gbps or me.gbps for m in members])
    return ClusterExperts(local, plan, chooser, group, store, members, cfg.hidden_size, cfg.num_experts_per_tok,
                          node_timeout_s)


def _place(ckpt: Checkpoint, local: ExpertBackend, me: RankFigures, members) -> ClusterPlan:
    """The plan from every rank's figures; the head's routing counts (if it has any) rank the replicas."""
    cfg = ckpt.config
    counts = {layer: c for layer, c in local.route_counts.items() if c.sum() > 0}
    ranks = [me] + [RankFigures(m.gbps or me.gbps, m.budget_bytes, m.holds) for m in members]
    return place(cfg.moe_layers, cfg.n_routed_experts, ranks, expert_span(ckpt, cfg.moe_layers[0], 0).length,
                 counts or None)
