#!/usr/bin/env python3
"""Several machines as one under an emulated network: measured decode tok/s beside `plan --nodes 2`.

    sudo python scripts/netem_cluster.py [--model k2-slice] [--case 50:10 --case 250:1] [--gen-tokens 16]

Creates network namespaces (kh-netem-head 10.231.0.1, kh-netem-node 10.231.0.2), runs `kimi-hybrid
bench --nodes 2` in one and `kimi-hybrid node` in the other, first on a bare link, then for each case
LAT_US:GBIT (a round trip gains LAT_US; each direction is limited to GBIT). With `tc netem` (kernel
CONFIG_NET_SCH_NETEM) the two namespaces share a veth pair and each end gets `netem delay LAT_US/2
rate GBIT`. A kernel without netem (e.g. a Firecracker guest) gets the same through a third namespace,
kh-netem-wire, in which this script relays the frames between two veth pairs itself (AF_PACKET,
holding each frame LAT_US/2 after its serialisation at GBIT): its own latency shows in the bare case.
Prints one JSON line per case: measured decode tok/s, the bench's per-layer overhead and network
share, the round trip ping measured, the projection from the same run's measured speeds (the head's
side, its own and the node's expert kernel times, the software's overhead:
hybrid.cluster.projection.measured_parts) with the network modelled at the case's ping and rate
(project_measured), the same from the bare link's run, and `kimi-hybrid plan --nodes 2 --net-gbps GBIT/8 --mem-gbps M`'s projection at
LAT_US and at the ping's round trip (M: the RAM bandwidth the bare run measured).
Needs root and iproute2 (ethtool and ping for the relay). Always removes its namespaces (also an
earlier run's leftovers, at start). Both "machines" share this one's cores and RAM; the projection
assumes each has its own.
"""
from __future__ import annotations

import argparse
import ctypes
import heapq
import json
import os
import secrets
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hybrid.cluster.projection import measured_parts, project_measured

NS_HEAD, NS_NODE, NS_WIRE = "kh-netem-head", "kh-netem-node", "kh-netem-wire"
VETH_HEAD, VETH_NODE = "kh-veth-h", "kh-veth-n"
WIRE_HEAD, WIRE_NODE = "kh-wire-h", "kh-wire-n"  # the relay's ends of the two pairs (relay mode)
MTU = 65000  # one frame per message: the relay forwards frames, never segments them
IP_HEAD, IP_NODE = "10.231.0.1", "10.231.0.2"
PORT = 29411
UNSHAPED_GBPS = 100.0  # GB/s: a link without a rate limit (the veth, or the relay at full speed)
CACHE = Path.home() / ".cache" / "kimi-hybrid"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


def cleanup() -> None:
    for ns in (NS_HEAD, NS_NODE, NS_WIRE):  # deleting a namespace deletes the veth ends in it, and so the pairs
        sh("ip", "netns", "del", ns, check=False)
    for dev in (VETH_HEAD, VETH_NODE, WIRE_HEAD, WIRE_NODE):
        sh("ip", "link", "del", dev, check=False)


def has_netem() -> bool:
    sh("ip", "link", "add", "kh-probe0", "type", "dummy", check=False)
    try:
        return sh("tc", "qdisc", "add", "dev", "kh-probe0", "root", "netem", "delay", "1us", check=False).returncode == 0
    finally:
        sh("ip", "link", "del", "kh-probe0", check=False)


def setup(relay: bool) -> None:
    """The namespaces and links: head <-> node (netem), or head <-> wire <-> node (relay)."""
    cleanup()
    for ns in (NS_HEAD, NS_NODE) + ((NS_WIRE,) if relay else ()):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    pairs = [(VETH_HEAD, WIRE_HEAD), (VETH_NODE, WIRE_NODE)] if relay else [(VETH_HEAD, VETH_NODE)]
    for a, b in pairs:
        sh("ip", "link", "add", a, "mtu", str(MTU), "type", "veth", "peer", "name", b, "mtu", str(MTU))
    if relay:
        for dev in (WIRE_HEAD, WIRE_NODE):
            sh("ip", "link", "set", dev, "netns", NS_WIRE)
            sh("ip", "-n", NS_WIRE, "link", "set", dev, "up")
    for ns, dev, ip in ((NS_HEAD, VETH_HEAD, IP_HEAD), (NS_NODE, VETH_NODE, IP_NODE)):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        if relay:  # frames read off a veth carry no checksum when offloaded: compute them in the sender
            sh("ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "off")


def shape(latency_us: float | None, gbit: float | None) -> None:
    """netem on both ends of the pair (half the round trip each way), or none."""
    for ns, dev in ((NS_HEAD, VETH_HEAD), (NS_NODE, VETH_NODE)):
        sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
        if latency_us is not None:
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", f"{latency_us / 2:g}us",
               "rate", f"{gbit:g}gbit", "limit", "100000")


def start_relay(latency_us: float | None, gbit: float | None) -> subprocess.Popen:
    """The relay in its namespace, once it listens on both ends."""
    cmd = ["ip", "netns", "exec", NS_WIRE, sys.executable, __file__, "--relay", str(latency_us or 0), str(gbit or 0)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    if not select.select([proc.stdout], [], [], 60)[0] or proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait(timeout=30)
        raise RuntimeError("the relay did not start")
    return proc


def relay(latency_us: float, gbit: float) -> None:
    """Forward every frame between WIRE_HEAD and WIRE_NODE, each held latency_us / 2 after it would have
    finished crossing a GBIT link (0: no limit) that carries one frame at a time per direction."""
    ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK 1 ns: wake when asked, not up to 50 us later
    socks = {}
    for dev in (WIRE_HEAD, WIRE_NODE):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
        s.bind((dev, 0))
        s.setblocking(False)
        socks[dev] = s
    other = {socks[WIRE_HEAD]: socks[WIRE_NODE], socks[WIRE_NODE]: socks[WIRE_HEAD]}
    free = dict.fromkeys(socks.values(), 0.0)  # when each direction's link is next free
    held: list = []  # (due, n, out socket, frame)
    n = 0
    print("ready", flush=True)
    while True:
        now = time.perf_counter()
        while held and held[0][0] <= now:
            _, _, out, frame = heapq.heappop(held)
            out.send(frame)
        wait = max(0.0, held[0][0] - now) if held else None
        ready, _, _ = select.select(list(socks.values()), [], [], wait)
        now = time.perf_counter()
        for s in ready:
            while True:
                try:
                    frame, addr = s.recvfrom(MTU + 64)
                except BlockingIOError:
                    break
                if addr[2] == socket.PACKET_OUTGOING:  # our own sends, seen again
                    continue
                out = other[s]
                start = max(now, free[out])
                free[out] = start + (len(frame) * 8 / (gbit * 1e9) if gbit else 0.0)
                n += 1
                heapq.heappush(held, (free[out] + latency_us * 0.5e-6, n, out, frame))


def ping_rtt_us() -> float | None:
    r = sh("ip", "netns", "exec", NS_HEAD, "ping", "-c", "50", "-i", "0.01", "-q", IP_NODE, check=False)
    for line in r.stdout.splitlines():  # rtt min/avg/max/mdev = a/b/c/d ms
        if "min/avg/max" in line:
            return 1e3 * float(line.split("=")[1].split("/")[1])
    return None


def run_case(model: str, args: argparse.Namespace) -> dict:
    """One bench on the cluster as it is shaped now: the bench's JSON."""
    env = dict(os.environ, KIMI_HYBRID_CLUSTER_TOKEN=secrets.token_hex(16))
    py = [sys.executable, "-m", "hybrid.cli"]
    node = py + ["node", "--head", f"{IP_HEAD}:{PORT}", "--model", model, "--join-timeout", str(args.timeout),
                 "--expert-mode", "mmap", "--cpu-threads", str(args.cpu_threads)]
    head = py + ["bench", "-m", model, "--nodes", "2", "--listen", f"{IP_HEAD}:{PORT}", "--json", "--expert-mode",
                 "mmap", "--backend", "numba", "--cpu-threads", str(args.cpu_threads), "--prompt-tokens",
                 str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--runs", str(args.runs),
                 "--probe-mb", "256", "--join-timeout", str(args.timeout)]
    with tempfile.TemporaryFile("w+") as node_log:
        n = subprocess.Popen(["ip", "netns", "exec", NS_NODE, *node], env=env, stdout=node_log,
                             stderr=subprocess.STDOUT, text=True)
        try:
            h = subprocess.run(["ip", "netns", "exec", NS_HEAD, *head], env=env, capture_output=True, text=True,
                               timeout=args.timeout)
            if h.returncode != 0:
                node_log.seek(0)
                raise RuntimeError(f"the head failed:\n{h.stderr[-3000:]}\nthe node said:\n{node_log.read()[-2000:]}")
            n.wait(timeout=60)
            return json.loads(h.stdout)
        finally:
            if n.poll() is None:
                n.kill()
                n.wait(timeout=60)


def projection(model: str, latency_us: float, gbit: float, mem_gbps: float) -> dict:
    r = subprocess.run([sys.executable, "-m", "hybrid.cli", "plan", "-m", model, "--nodes", "2", "--net-latency-us",
                        f"{latency_us:g}", "--net-gbps", f"{gbit / 8:g}", "--mem-gbps", f"{mem_gbps:.2f}", "--json"],
                       capture_output=True, text=True, timeout=300, check=True)
    return json.loads(r.stdout)


def default_model() -> str:
    slices = sorted(CACHE.glob("k2-slice*"))
    return str(slices[-1]) if slices else "tiny"


def main() -> None:
    if sys.argv[1:2] == ["--relay"]:
        return relay(float(sys.argv[2]), float(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: k2-slice if generated, else tiny)")
    ap.add_argument("--case", action="append", help="LAT_US:GBIT, a round trip's added latency and the rate "
                    "(default: 50:10 and 250:1)")
    ap.add_argument("--emulator", choices=("auto", "netem", "relay"), default="auto",
                    help="tc netem, or this script's relay (auto: netem when the kernel has it)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--cpu-threads", type=int, default=1, help="expert threads, head and node each")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for one case")
    ap.add_argument("--save", type=Path, help="also write each case's bench JSON into this directory")
    args = ap.parse_args()
    model = args.model or default_model()
    cases = [(None, None)] + [tuple(float(v) for v in c.split(":")) for c in (args.case or ["50:10", "250:1"])]
    use_relay = args.emulator == "relay" or (args.emulator == "auto" and not has_netem())
    setup(use_relay)
    hidden = json.loads((Path(resolve(model)) / "config.json").read_text())["hidden_size"]
    try:
        mem_gbps, bare = None, None
        for lat, gbit in cases:
            relay_proc = start_relay(lat, gbit) if use_relay else None
            try:
                if not use_relay:
                    shape(lat, gbit)
                rtt = ping_rtt_us()
                r = run_case(model, args)
            finally:
                if relay_proc is not None:
                    relay_proc.kill()
                    relay_proc.wait(timeout=30)
            mem_gbps = mem_gbps or r["machine"]["mem_read_gbps"]
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                (args.save / f"bench-{'bare' if lat is None else f'{lat:g}us-{gbit:g}gbit'}.json").write_text(json.dumps(r))
            bare = bare or measured_parts(r, hidden, rtt or 0.0, UNSHAPED_GBPS)
            row = report(model, lat, gbit, rtt, r, mem_gbps, "relay" if use_relay else "netem")
            link = gbit / 8 if gbit else UNSHAPED_GBPS
            same = project_measured(measured_parts(r, hidden, rtt or 0.0, link), rtt or 0.0, link)
            row["projected_tok_s_same_run"] = same["tok_s"]  # this run's measured speeds, the network modelled
            row["measured_over_projected_same_run"] = row["decode_tok_s"] / same["tok_s"]
            p = project_measured(bare, rtt or 0.0, link)
            row["projected_tok_s_from_bare_run"] = p["tok_s"]
            row["measured_over_projected_from_bare_run"] = row["decode_tok_s"] / p["tok_s"]
            row["bare_run_parts_ms"] = {k: bare[k] for k in ("side_ms", "head_ms", "node_ms", "software_ms", "calls")}
            print(json.dumps(row), flush=True)
    finally:
        cleanup()


def report(model: str, lat: float | None, gbit: float | None, rtt: float | None, r: dict, mem_gbps: float,
           emulator: str) -> dict:
    c = r["decode"]["cluster"]
    row = {"emulator": emulator, "added": "none" if lat is None else f"{lat:g} us round trip, {gbit:g} Gbit/s",
           "ping_rtt_us": rtt, "model": Path(r["model"]["name"]).name, "loadavg_1min": r["machine"]["loadavg_1min"],
           "decode_tok_s": r["decode"]["tok_s"]["median"],
           "overhead_ms_per_moe_layer": c["overhead_ms_per_moe_layer"],
           "network_ms_per_token": c["network_ms_per_token"], "network_share": c["network_share"],
           "node_compute_ms_per_token": c["nodes"]["compute_ms_per_token"], "lost": c["lost"],
           "mem_read_gbps": mem_gbps}
    for key, us in (("at_added", lat), ("at_ping", rtt)):
        if us is not None:
            p = projection(model, us, gbit or 10.0, mem_gbps)["cluster"]
            row[f"projected_tok_s_{key}"] = p["tok_s"]
            row[f"measured_over_projected_{key}"] = row["decode_tok_s"] / p["tok_s"]
    return row


def resolve(model: str) -> str:
    """A preset name (tiny, k2-slice) -> its directory in the cache; a path as given."""
    if Path(model).is_dir():
        return model
    found = sorted(CACHE.glob(f"{model}-seed*"))
    if not found:
        raise SystemExit(f"{model}: no such directory, and no generated preset of that name in {CACHE}")
    return str(found[-1])


if __name__ == "__main__":
    main()
