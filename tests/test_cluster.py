"""Several machines as one (hybrid.cluster), on loopback: the head in this process, expert nodes as
`kimi-hybrid node` processes (or, for the handshake's refusals, a node session in a thread).

Invariants: 2 and 3 ranks give the single-process engine's greedy tokens and its logits within 1e-4;
a node with another checkpoint or a wrong token is refused on both sides, saying what differs; a
node killed or stalled mid-generation fails the request in flight within the timeout, and the head
then computes every expert itself with its KV cache intact (same tokens, prefix reuse included).
Every process is started with bounded waits and killed in a finally.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

import hybrid
from hybrid.cluster.link import ClusterError, NodeLost
from hybrid.cluster.node import NodeOptions, run_node
from hybrid.cluster.plan import RankFigures, place, split
from hybrid.cluster import wire
from kernels_cpu.simd import host_has_avx2

pytestmark = pytest.mark.skipif(not host_has_avx2(), reason="the Numba INT4 kernels need AVX2 + FMA")

TOKEN = "a-test-secret-0123"
PROMPT = list(range(5, 40))
N_NEW = 10
JOIN_S = 90.0  # a node process imports torch and numba: slow on a loaded 2-core machine
WAIT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def nodes(path, n: int, port: int, token: str = TOKEN, extra: dict[int, list[str]] | None = None):
    """n `kimi-hybrid node` processes joining 127.0.0.1:port (node i with the flags extra[i] too); killed on
    the way out if still running."""
    env = dict(os.environ, KIMI_HYBRID_CLUSTER_TOKEN=token)
    cmd = [sys.executable, "-m", "hybrid.cli", "node", "--head", f"127.0.0.1:{port}", "--model", str(path),
           "--join-timeout", str(JOIN_S), "--cpu-threads", "1"]
    logs = [tempfile.TemporaryFile("w+") for _ in range(n)]  # files, not pipes: a full pipe would block a node
    procs = [subprocess.Popen(cmd + (extra or {}).get(i, []), env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
             for i, log in enumerate(logs)]
    try:
        yield procs, logs
    finally:
        for p, log in zip(procs, logs):
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                pass
            log.close()


def output(log) -> str:
    log.seek(0)
    return log.read()


def head(path, world: int, port: int, **kw):
    kw = {"join_timeout": JOIN_S, **kw}
    return hybrid.load(path, backend="numba", expert_mode="mmap", nodes=world, listen=f"127.0.0.1:{port}",
                       token=TOKEN, **kw)


@pytest.fixture(scope="module")
def single(tiny_path):
    """The single-process engine's greedy tokens and logits: what every cluster must give."""
    with hybrid.load(tiny_path, backend="numba", expert_mode="mmap") as e:
        return [s.token for s in e.generate(PROMPT, N_NEW, temperature=0)], e.logits(PROMPT)


@pytest.mark.parametrize("world", [2, 3])
def test_a_cluster_gives_the_single_process_tokens_and_logits(tiny_path, single, world):
    tokens, logits = single
    port = free_port()
    with nodes(tiny_path, world - 1, port) as (procs, logs):
        with head(tiny_path, world, port) as e:
            assert [s.token for s in e.generate(PROMPT, N_NEW, temperature=0)] == tokens
            got = e.logits(PROMPT)
            assert float((got - logits).abs().max()) <= 1e-4 * max(1.0, float(logits.abs().max()))
            st = e.stats()["cluster"]
            per_rank, gbps = np.array(st["experts_per_rank"]), np.array(st["gbps_per_rank"])
            # tiny: 2 MoE layers of 16 experts, first choices in proportion to the measured speeds (each layer
            # rounds); RAM for all of them everywhere, so every rank holds every expert
            assert st["lost"] is None and per_rank.sum() == 32 and st["held_per_rank"] == [32] * world
            assert np.abs(per_rank - 32 * gbps / gbps.sum()).max() <= 2
            assert all(n["requests"] > 0 and n["state"] == "serving" for n in st["nodes"])
            b = st["balance"]  # every expert everywhere: each call's work as even as whole experts allow
            assert b["layer_calls"] > 0 and b["load_max_over_ideal"] <= b["load_max_over_ideal_owners_only"]
        for p, log in zip(procs, logs):  # closing the engine ends the nodes' session: they exit cleanly
            assert p.wait(timeout=WAIT_S) == 0, output(log)
            assert "the head closed the session" in output(log)


def test_the_head_in_ram_mode_copies_its_share_and_reads_the_rest_in_place(tiny_path, single, monkeypatch):
    """expert_mode='ram' on the head: the share the plan gives it (a RAM budget of 12 experts here) is copied into
    its memory, every other expert stays in the shard maps; the cluster gives the single process's tokens, and so
    does the head alone once its node is lost (it then computes the experts it did not copy, in place)."""
    from hybrid.checkpoint.reader import Checkpoint
    from hybrid.cluster import head as cluster_head
    from hybrid.experts.mmap_tables import mmap_tables

    tokens, _ = single
    ck = Checkpoint(tiny_path)
    per = next(iter(mmap_tables(ck).values())).expert_nbytes
    ck.close()
    monkeypatch.setattr(cluster_head, "head_budget", lambda ckpt: 12 * per)
    port = free_port()
    with nodes(tiny_path, 1, port) as ((proc,), _):
        with hybrid.load(tiny_path, backend="numba", expert_mode="ram", nodes=2, listen=f"127.0.0.1:{port}",
                         token=TOKEN, join_timeout=JOIN_S, node_timeout=2.0) as e:
            cluster = e.model.experts
            held = cluster.plan.held_by(0)
            assert 0 < held.sum() < held.size
            for i, (layer, t) in enumerate(sorted(cluster.local.mapped_tables.items())):
                for ex in range(held.shape[1]):
                    a, off = (int(v) for v in t.loc[ex, 0])
                    assert (a == 0) == held[i, ex], (layer, ex)  # arena 0: the copy; the others: the maps
            assert [s.token for s in e.generate(PROMPT, N_NEW, temperature=0)] == tokens
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=WAIT_S)
            with pytest.raises(NodeLost):
                list(e.generate(PROMPT[:-1], N_NEW, temperature=0))
            assert [s.token for s in e.generate(PROMPT, N_NEW, temperature=0)] == tokens


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_node_lost_mid_generation_fails_the_request_then_the_head_carries_on(tiny_path, single, how):
    tokens, _ = single
    port, timeout = free_port(), 2.0
    with nodes(tiny_path, 1, port) as ((proc,), _):
        with head(tiny_path, 2, port, node_timeout=timeout) as e:
            gen = e.generate(PROMPT, N_NEW, temperature=0)
            got = [next(gen).token for _ in range(3)]
            os.kill(proc.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            if how == "kill":
                proc.wait(timeout=WAIT_S)
            t0 = time.monotonic()
            with pytest.raises(NodeLost) as lost:
                for s in gen:
                    got.append(s.token)
            assert time.monotonic() - t0 < timeout + 3.0
            assert "node 1" in str(lost.value) and "computes every expert itself" in str(lost.value)
            # a stalled node times out; a dead one is usually seen at once (its connection closes), though
            # gloo sometimes only notices at the deadline
            assert "did not answer in time" in str(lost.value) or (how == "kill" and "went away" in str(lost.value))
            assert got == tokens[:len(got)]
            # recovery: the head computes everything; the KV cache kept what it held (prefix reuse)
            rest = list(e.generate(PROMPT + got, N_NEW - len(got), temperature=0))
            assert rest[0].prefill_tokens <= 2 and [s.token for s in rest] == tokens[len(got):]
            assert [s.token for s in e.generate(PROMPT, N_NEW, temperature=0)] == tokens
            st = e.model.experts.stats()["cluster"]
            assert st["lost"] and st["nodes"][0]["state"].startswith("lost")
        proc.kill()


def _node_thread(path, port: int, token: str) -> tuple[threading.Thread, list]:
    """A node session in a thread of this process: -> (the thread, [what it raised or returned])."""
    result: list = []

    def run():
        try:
            result.append(run_node(path, NodeOptions(head=f"127.0.0.1:{port}", token=token, join_timeout_s=WAIT_S)))
        except Exception as e:  # noqa: BLE001 (the test reads it)
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def _broken_copy(path, tmp_path):
    """tiny with its last shard cut short: the reader refuses it, naming the file."""
    out = tmp_path / "broken"
    shutil.copytree(path, out)
    shard = max(out.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    return out


@pytest.mark.parametrize("case, says", [("another checkpoint", "tensor data differ"), ("wrong token", "wrong token"),
                                        ("broken checkpoint", "its checkpoint cannot be used")])
def test_a_mismatched_node_is_refused_on_both_sides(tiny_path, make_checkpoint, tmp_path, case, says):
    node_path = {"another checkpoint": lambda: make_checkpoint(seed=1), "wrong token": lambda: tiny_path,
                 "broken checkpoint": lambda: _broken_copy(tiny_path, tmp_path)}[case]()
    port = free_port()
    t, result = _node_thread(node_path, port, "not-the-secret" if case == "wrong token" else TOKEN)
    with pytest.raises(ClusterError) as refused:
        head(tiny_path, 2, port, join_timeout=WAIT_S)
    t.join(WAIT_S)
    assert not t.is_alive() and isinstance(result[0], ClusterError)
    assert "node 1" in str(refused.value) and says in str(refused.value)
    if case == "broken checkpoint":  # the node refuses itself, telling the head which file
        assert "safetensors" in str(refused.value) and "refused to join" in str(result[0])
    else:
        assert "the head refused this node" in str(result[0]) and says in str(result[0])


# ---- no network -----------------------------------------------------------------------------------
def test_the_handshake_formats_round_trip_and_refuse_another_version():
    ident = wire.Identity(b"c" * 32, b"i" * 32, b"d" * 32)
    hello = wire.Hello(3, 60000, b"n" * 16, ident)
    assert wire.parse_hello(wire.pack_hello(hello)) == hello
    join = wire.Join(wire.OK, b"m" * 16, ident, b"p" * 32, 2**40, 16, "host 10.0.0.2")
    assert wire.parse_join(wire.pack_join(join)) == join
    raw = bytearray(wire.pack_hello(hello))
    raw[4:6] = (wire.VERSION + 1).to_bytes(2, "little")
    with pytest.raises(wire.WireError, match="protocol version .* install the same kimi-hybrid version"):
        wire.parse_hello(bytes(raw))
    with pytest.raises(wire.WireError, match="not a kimi-hybrid cluster message"):
        wire.parse_join(b"GET / HTTP/1.1\r\n" + bytes(200))


def test_a_layer_request_round_trips():
    T, K, D = 3, 4, 16
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((T, D), np.float32), rng.random((T, K), np.float32)
    ids, who = rng.integers(0, 32, (T, K)), rng.integers(0, 3, (T, K)).astype(np.uint8)
    for tokens in (1, T):
        req = np.zeros(wire.request_nbytes(K, D), np.uint8)
        payload = np.zeros(wire.payload_nbytes(tokens, K, D), np.uint8)
        wire.pack_request(req, wire.LAYER, 7, 42, x[:tokens], ids[:tokens], w[:tokens], who[:tokens], payload)
        r, k, d = wire.parse_request(req)
        assert (r.cmd, r.layer, r.tokens, r.seq, k, d) == (wire.LAYER, 7, tokens, 42, K, D)
        body = req[wire.REQ_HEAD:] if tokens == 1 else payload
        for a, b in zip(wire.payload_views(body, tokens, K, D), (x, w, ids, who)):
            np.testing.assert_array_equal(a, b[:tokens])


def test_a_reply_round_trips_with_the_nodes_figures():
    T, D = 2, 16
    buf = np.zeros(wire.REPLY_HEAD + T * D * 4, np.uint8)
    wire.reply_sum(buf, T, D)[...] = np.arange(T * D, dtype=np.float32).reshape(T, D)
    reply = wire.Reply(9, wire.OK, 5, 0.25, 3 << 33, 12345)
    wire.pack_reply(buf, reply)
    assert wire.parse_reply(buf) == reply and wire.reply_sum(buf, T, D)[1, 0] == D


def test_the_split_covers_every_expert_in_proportion_and_rotates():
    plan = split([1, 2, 3], 384, [1.0, 1.0, 2.0])
    assert [plan.experts_of(r) for r in range(3)] == [96 * 3, 96 * 3, 192 * 3]
    assert not (plan.owner[0] == plan.owner[1]).all()  # each layer rotated: no fixed blocks
    assert not plan.replicated and [plan.held_of(r) for r in range(3)] == [96 * 3, 96 * 3, 192 * 3]


@pytest.mark.parametrize("opts, says", [
    (dict(nodes=2), "nodes=2 needs listen='HOST:PORT'"),
    (dict(nodes=2, listen="0.0.0.0:29400", token=TOKEN), "binds every interface"),
    (dict(nodes=2, listen="[::]:29400", token=TOKEN), "binds every interface"),
    (dict(nodes=2, listen="127.0.0.1", token=TOKEN), "listen must be HOST:PORT"),
    (dict(nodes=2, listen="127.0.0.1:29400", token="short"), "at least 8 characters"),
    (dict(listen="127.0.0.1:29400"), "give nodes >= 2"),
])
def test_cluster_options_are_refused_up_front(opts, says, monkeypatch):
    monkeypatch.delenv("KIMI_HYBRID_CLUSTER_TOKEN", raising=False)
    from hybrid.runtime.options import LoadOptions

    with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("(", r"\(")):
        LoadOptions(**opts)
    LoadOptions(nodes=2, listen="0.0.0.0:29400", token=TOKEN, listen_any=True)  # asked for explicitly
    monkeypatch.setenv("KIMI_HYBRID_CLUSTER_TOKEN", TOKEN)  # stands in for token, and alone changes nothing
    LoadOptions(nodes=2, listen="127.0.0.1:29400")
    LoadOptions()


def test_the_cluster_projection_counts_the_busiest_machine_and_the_round_trips():
    from hybrid.cluster.projection import busiest_share, project_cluster

    assert busiest_share(384, 8, 1) == 8 and 3.8 < busiest_share(384, 8, 3) < 4.3  # scale_out.md: about 4 of 8
    one = project_cluster(1, 60, 384, 8, 7168, 24_800_000, None, 80.0, None, 0.0, 1.25, 50.0)
    three = project_cluster(3, 60, 384, 8, 7168, 24_800_000, None, 80.0, None, 0.0, 1.25, 50.0)
    assert one["net_s"] == 0 and abs(one["ram_s"] - 60 * 8 * 24.8e6 / 80e9) < 1e-9
    assert three["net_s"] >= 60 * 50e-6 and three["ram_s"] < one["ram_s"] / 1.8
    assert three["tok_s"] == pytest.approx(1 / (three["ram_s"] + three["net_s"]))
    with pytest.raises(ValueError, match="disk_gbps"):
        project_cluster(3, 60, 384, 8, 7168, 24_800_000, 1000, 80.0, None, 0.0, 1.25, 50.0)


def test_plan_projects_several_machines():
    import json

    from click.testing import CliRunner

    from hybrid.cli.main import main

    args = ["plan", "--ram-gb", "192", "--gpu-gb", "24", "--mem-gbps", "80", "--disk-gbps", "7", "--gpu-gbps", "1000"]
    one = json.loads(CliRunner().invoke(main, args + ["--json"]).output)
    r = CliRunner().invoke(main, args + ["--nodes", "3", "--json"])
    three = json.loads(r.output)
    assert one["cluster"] is None and three["cluster"]["world"] == 3
    assert three["cluster"]["tok_s"] > 5 * one["projection"]["tok_s"]  # RAM speed instead of the disk's
