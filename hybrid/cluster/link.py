"""The transport: a TCP store for the rendezvous and a gloo process group for the per-layer messages.

Owns binding to the interface the user names (a wildcard only when asked for), the store's server
socket, the gloo devices, and point-to-point sends and receives that end by a deadline: a peer that
died is an error at once (gloo sees the connection close), one that stalls after `timeout_s`.
No formats (wire.py) and no expert work (backend.py, node.py).
"""
from __future__ import annotations

import datetime as dt
import re
import socket
import time

import numpy as np
import torch
import torch.distributed as dist

from hybrid.cluster.wire import is_wildcard

IDLE_S = 7 * 24 * 3600  # how long a node waits for the head's next request (a dead head is seen at once)


class ClusterError(ConnectionError):
    """The cluster cannot form or serve: a refused join, a node that went away; the text says what to do."""


class NodeLost(ClusterError):
    """A node died, stalled or failed during a request: rank and the reason."""

    def __init__(self, rank: int, name: str, reason: str):
        self.rank, self.name, self.reason = rank, name, reason
        super().__init__(f"node {rank} ({name}) {reason}")


def seconds(s: float) -> dt.timedelta:
    return dt.timedelta(seconds=s)


def serve_store(host: str, port: int, allow_wildcard: bool, timeout_s: float) -> dist.TCPStore:
    """The head's rendezvous store, listening on host:port only (torch's own server would bind every
    interface: it is handed a socket bound here instead)."""
    if is_wildcard(host) and not allow_wildcard:
        raise ValueError(f"listen address {host!r} binds every interface, and the cluster has no encryption; name "
                         "the interface of the trusted network (e.g. 192.168.1.10:29400), or allow a wildcard "
                         "explicitly (listen_any=True, --listen-any)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ClusterError(f"cannot listen on {host}:{port} ({e.strerror}); is the port in use, or the address "
                           "not one of this machine's?") from None
    fd = sock.detach()  # the store owns the socket from here
    try:
        return dist.TCPStore(host, port, None, True, seconds(timeout_s), wait_for_workers=False,
                             master_listen_fd=fd)
    except BaseException:
        socket.socket(fileno=fd).close()
        raise


def join_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A node's connection to the head's store; retries until timeout_s (the head may start later)."""
    try:
        return dist.TCPStore(host, port, None, False, seconds(timeout_s))
    except (RuntimeError, dist.DistError) as e:
        raise ClusterError(f"no head answered at {host}:{port} within {timeout_s:.0f} s ({first_line(e)}); start "
                           "the head (--nodes N --listen HOST:PORT) or check the address and firewall") from None


def address_toward(host: str, port: int) -> str:
    """This machine's address on the route to host (what a node's gloo device binds; no wildcard)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # UDP: no packet is sent, only the route is looked up
        return s.getsockname()[0]


def first_line(e: BaseException) -> str:
    """The gist of a torch.distributed error: its first line, without gloo's source location and advice."""
    text = str(e).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else type(e).__name__
    return line.split(". This is typically", 1)[0][:300]


class Group:
    """A gloo process group of `world` ranks over uint8 messages, with deadlines."""

    def __init__(self, store: dist.Store, rank: int, world: int, hostname: str | None, setup_s: float):
        """hostname: the address this rank's connections bind to (None: the one this machine's name
        resolves to, for a head listening on a wildcard)."""
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=hostname) if hostname else
                         dist.ProcessGroupGloo.create_default_device()]
        opts._timeout = seconds(setup_s)
        try:
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore("khc/pg", store), rank, world, opts)
        except (RuntimeError, dist.DistError) as e:
            raise ClusterError(f"the cluster's connections did not come up within {setup_s:.0f} s "
                               f"({first_line(e)}); check that every machine can reach the others' addresses "
                               "(firewall)") from None
        self.rank, self.world = rank, world

    def send(self, buf: np.ndarray, dst: int, tag: int):
        return self.pg.send([torch.from_numpy(buf)], dst, tag)

    def recv(self, buf: np.ndarray, src: int, tag: int):
        return self.pg.recv([torch.from_numpy(buf)], src, tag)

    @staticmethod
    def wait(work, deadline: float) -> str | None:
        """Wait for a send or receive until `deadline` (time.monotonic()); None when it completed,
        else why not (the peer closed the connection, or the time ran out)."""
        left = max(deadline - time.monotonic(), 0.001)
        try:
            work.wait(seconds(left))
        except (RuntimeError, dist.DistError) as e:
            text = str(e)
            if "Timed out" in text or "timed out" in text or time.monotonic() >= deadline:
                return "did not answer in time (stalled, or cut off from the network)"
            return f"went away ({first_line(e)})"
        return None

    def close(self) -> None:
        """Drop the connections (peers see them close). The group is unusable afterwards."""
        try:
            self.pg.abort()
        except (RuntimeError, dist.DistError, AttributeError):
            pass
        self.pg = None
