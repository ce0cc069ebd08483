"""connect: the head's side of forming a cluster, from its local expert backend to a ClusterExperts.

Owns the order: check the options, fingerprint the checkpoint, listen on the named interface, admit
the nodes, split the experts, wait for every node to load its share, open the gloo connections.
A failure at any step closes what was opened and raises (ClusterError, ValueError), leaving the
local backend to the caller.
"""
from __future__ import annotations

import logging
import os

from hybrid.checkpoint.reader import Checkpoint
from hybrid.cluster.backend import ClusterExperts
from hybrid.cluster.identity import checkpoint_identity
from hybrid.cluster.link import Group, serve_store
from hybrid.cluster.plan import split
from hybrid.cluster.rendezvous import admit, publish_plan
from hybrid.cluster.token import TOKEN_ENV, check_token
from hybrid.cluster.wire import is_wildcard, parse_address
from hybrid.experts.backend import ExpertBackend

log = logging.getLogger(__name__)

SETUP_MIN_S = 30.0  # at least this long for the gloo connections to come up


def connect(ckpt: Checkpoint, local: ExpertBackend, nodes: int, listen: str, token: str | None = None,
            node_timeout_s: float = 60.0, join_timeout_s: float = 600.0, listen_any: bool = False) -> ClusterExperts:
    """Wait for nodes - 1 expert nodes to join at `listen` ('HOST:PORT'), then return the backend that
    splits every MoE layer's experts between this head (rank 0, computing on `local`) and them.
    token: the shared secret (None: $KIMI_HYBRID_CLUSTER_TOKEN)."""
    host, port = parse_address(listen)
    secret = check_token(token if token is not None else os.environ.get(TOKEN_ENV))
    cfg = ckpt.config
    identity = checkpoint_identity(ckpt)
    store = serve_store(host, port, listen_any, join_timeout_s)
    log.info("cluster: waiting at %s for %d node(s)", listen, nodes - 1)
    try:
        where = f"THIS_MACHINE:{port}" if is_wildcard(host) else listen  # what a node passes as --head
        members = admit(store, secret, nodes, identity, node_timeout_s, join_timeout_s, where)
        plan = split(cfg.moe_layers, cfg.n_routed_experts, [1.0] * nodes)
        publish_plan(store, nodes, plan.owner, plan.digest(), members, join_timeout_s)
        group = Group(store, 0, nodes, None if is_wildcard(host) else host, max(node_timeout_s, SETUP_MIN_S))
    except BaseException as e:
        # the traceback's frames hold the store: drop them, so the store closes now and waiting nodes see
        # the head leave instead of waiting out their timeout
        e.__traceback__ = None
        del store
        raise
    log.info("cluster: %d ranks serving; each holds %s routed experts", nodes,
             ", ".join(str(plan.experts_of(r)) for r in range(nodes)))
    return ClusterExperts(local, plan, group, store, members, cfg.hidden_size, cfg.num_experts_per_tok,
                          node_timeout_s)
