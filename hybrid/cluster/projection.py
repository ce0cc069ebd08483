"""What N machines could decode at best: each MoE layer's experts split evenly over N alike machines,
every layer waiting for its busiest machine and one network round trip.

Owns the arithmetic only (kimi-hybrid plan --nodes renders it): the expected busiest machine's share of
a layer's top-k (routing i.i.d. uniform, as the single-machine projection assumes), its RAM and disk
time, and the network's time per layer. GB = 10^9 bytes.
"""
from __future__ import annotations

import numpy as np

from hybrid.cluster.wire import REPLY_HEAD, REQ_HEAD, payload_nbytes


def busiest_share(n_experts: int, top_k: int, world: int, samples: int = 8000) -> float:
    """Expected largest number of a token's top_k experts that one of `world` equal shares holds
    (uniform routing without repeats; a fixed-seed estimate)."""
    if world == 1:
        return float(top_k)
    rng = np.random.default_rng(0)
    picks = rng.random((samples, n_experts)).argpartition(top_k, axis=1)[:, :top_k] % world  # each pick's rank
    counts = np.stack([(picks == r).sum(axis=1) for r in range(world)], axis=1)
    return float(counts.max(axis=1).mean())


def project_cluster(world: int, moe_layers: int, n_experts: int, top_k: int, hidden: int, expert_bytes: int,
                    slots_per_node: int | None, mem_gbps: float, disk_gbps: float | None, head_side_s: float,
                    net_gbps: float, net_latency_us: float) -> dict:
    """Decode ceiling (batch 1) of `world` alike machines, the head included.

    slots_per_node: routed experts one machine's RAM holds (None: all of its share, mmap).
    head_side_s: the head's own non-expert time per token (GPU side; on a CPU-only head its RAM term).
    net_latency_us: one request-reply round trip; net_gbps: the head's link (its requests to every node
    and their replies cross it)."""
    share = moe_layers * n_experts / world  # experts each machine holds
    hit = 1.0 if slots_per_node is None else min(1.0, slots_per_node / share)
    busiest = busiest_share(n_experts, top_k, world)
    layer_bytes = busiest * expert_bytes
    ram_s = moe_layers * layer_bytes * hit / (mem_gbps * 1e9)
    miss_bytes = moe_layers * layer_bytes * (1 - hit)
    if miss_bytes and not disk_gbps:
        raise ValueError("a machine's share does not fit its RAM: pass disk_gbps for the misses")
    disk_s = miss_bytes / (disk_gbps * 1e9) if miss_bytes else 0.0
    msg = REQ_HEAD + payload_nbytes(1, top_k, hidden) + REPLY_HEAD + 4 * hidden  # one node, one token
    net_s = 0.0 if world == 1 else moe_layers * (net_latency_us * 1e-6 + (world - 1) * msg / (net_gbps * 1e9))
    experts_s = max(ram_s, disk_s)
    tok_s = 1 / (max(experts_s, head_side_s) + net_s)
    explain = [
        f"{world} machines hold {share:,.0f} routed experts each; RAM holds "
        f"{'all of them' if hit == 1 else f'{hit:.0%} of them'}",
        f"the busiest machine computes {busiest:.2f} of a token's {top_k} experts per layer on average "
        f"(an even split would be {top_k / world:.2f})",
        f"per token: its RAM {1e3 * ram_s:,.1f} ms, its disk {1e3 * disk_s:,.1f} ms; the network "
        f"{1e3 * net_s:,.1f} ms ({moe_layers} round trips of {net_latency_us:g} us, {msg / 1e3:.1f} KB per node "
        f"at {net_gbps:g} GB/s); the head's own side {1e3 * head_side_s:,.1f} ms",
        f"ceiling {tok_s:.2f} tok/s (experts and the head's side overlapped, the network not)",
    ]
    return {"world": world, "experts_per_machine": share, "hit_rate": hit, "busiest_share": busiest,
            "ram_s": ram_s, "disk_s": disk_s, "net_s": net_s, "head_side_s": head_side_s, "tok_s": tok_s,
            "tok_s_serial": 1 / (experts_s + head_side_s + net_s), "explain": explain}


def wire_bytes(world: int, top_k: int, hidden: int) -> int:
    """Bytes one decoded token's MoE layer puts on the head's link: a request and a reply per node."""
    return (world - 1) * (REQ_HEAD + payload_nbytes(1, top_k, hidden) + REPLY_HEAD + 4 * hidden)


def measured_parts(run: dict, hidden: int, rtt_us: float, net_gbps: float) -> dict:
    """A cluster bench run's own speeds (`bench --json` with --nodes; the link it ran on: rtt_us round trip,
    net_gbps GB/s), per decoded token: the head's side (its measured GPU-side time, its own overhead and
    what the engine did not account for: everything but waiting on the experts), and per call
    the head's own expert time, the busiest node's, and the software's part of the per-layer overhead
    (what is left of it once the network's exposed part, the round trip and wire time not hidden under
    the head's own share, is taken out)."""
    d, m = run["decode"], run["model"]
    c, split = d["cluster"], d["split_ms_per_token"]
    calls = c["layer_calls_per_token"]
    head_ms = split["experts_compute"] / calls  # the head's own share, per call
    node_ms = max(c["nodes"]["compute_ms_per_token"]) / calls
    nbytes = wire_bytes(c["world"], m["experts_per_token"], hidden)
    exposed = max(0.0, node_ms + rtt_us / 1e3 + nbytes / (net_gbps * 1e6) - head_ms)
    side_ms = split["gpu_side"] + split["overhead"] + split["unaccounted"] + split["io_wait"]
    return {"world": c["world"], "calls": calls, "side_ms": side_ms, "head_ms": head_ms, "node_ms": node_ms,
            "software_ms": max(0.0, c["overhead_ms_per_moe_layer"] - exposed), "wire_bytes": nbytes}


def project_measured(parts: dict, rtt_us: float, net_gbps: float) -> dict:
    """Decode tok/s with a run's measured parts (measured_parts) on another link: each MoE layer call ends
    when the head's own share and the busiest node's (plus a round trip and the wire time) are both
    done, plus the software's overhead."""
    net_ms = rtt_us / 1e3 + parts["wire_bytes"] / (net_gbps * 1e6)
    layer_ms = max(parts["head_ms"], parts["node_ms"] + net_ms) + parts["software_ms"]
    token_ms = parts["side_ms"] + parts["calls"] * layer_ms
    return {"tok_s": 1e3 / token_ms, "token_ms": token_ms, "layer_ms": layer_ms, **parts}
