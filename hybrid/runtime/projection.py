"""What a placement Plan can do at best: the batch-1 decode ceiling from the bytes one token reads in
each stage (RAM, disk, GPU) over that stage's bandwidth, measured or given.

Owns the projection only (kimi-hybrid plan renders it); it decides nothing about placement (placement.py)
and measures nothing (probe.py). GB = 10^9 bytes.
"""
from __future__ import annotations

from hybrid.checkpoint.config import ModelConfig
from hybrid.runtime.hardware import GB
from hybrid.runtime.placement import GPU_SIDE, Plan


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def projected_decode_tps(plan: Plan, cfg: ModelConfig, mem_read_gbps: float, disk_gbps: float | None = None,
                         hit_rate: float | None = None, gpu_gbps: float | None = None) -> dict:
    """Decode ceiling (batch 1) from bytes per token over bandwidth, stage by stage.

    Routed bytes per token = experts_per_token x MoE layers x one expert (size_report's figure). Hot
    experts take hot/E of them off the CPU (uniform routing assumed). Cache misses come from disk:
    hit_rate defaults to the cache's share of all experts (what i.i.d. routing would give; replayed
    traces give the real figure). The KV term assumes a full cache. On a CPU-only plan the GPU-side
    weights are read from RAM by the same cores: they join the RAM term. Returns bytes per token,
    seconds per token per stage, tok_s (stages overlapped), tok_s_serial (summed), bottleneck, explain.
    tok_s and tok_s_serial are None when nothing counted takes time (all on a GPU of unknown bandwidth).
    """
    if len(cfg.moe_layers) != plan.n_moe_layers or cfg.n_routed_experts != plan.experts_per_layer:
        raise ValueError("the plan was made for a different model config")
    routed = plan.expert_bytes_per_token
    hot_frac = plan.hot_experts_per_layer / plan.experts_per_layer
    cpu_experts = int(routed * (1 - hot_frac))
    gpu_experts = routed - cpu_experts
    capacity = min(1.0, plan.cache_slots / (plan.n_moe_layers * plan.experts_per_layer))
    hit = 1.0 if plan.expert_mode == "mmap" else capacity if hit_rate is None else hit_rate
    if not 0 <= hit <= 1:
        raise ValueError(f"hit_rate must lie in 0..1, got {hit}")
    miss = int(cpu_experts * (1 - hit))
    side = sum(e.nbytes for e in plan.entries if e.what in GPU_SIDE + ("kv_cache",))
    if miss and not disk_gbps:
        raise ValueError(f"cache misses read {_gb(miss)} per token from disk; pass disk_gbps")
    terms: dict[str, float | None] = {"disk": miss / (disk_gbps * GB) if miss else 0.0}
    if plan.device == "cpu":
        terms.update(ram=(cpu_experts + side) / (mem_read_gbps * GB), gpu=0.0)
    else:
        terms.update(ram=cpu_experts / (mem_read_gbps * GB), gpu=(side + gpu_experts) / (gpu_gbps * GB) if gpu_gbps else None)
    known = {k: v for k, v in terms.items() if v is not None}
    worst = max(known, key=known.get)
    serial, overlapped = sum(known.values()), known[worst]
    explain = [f"routed experts: {plan.experts_per_token} x {plan.n_moe_layers} layers x "
               f"{plan.expert_bytes / 1e6:.1f} MB = {_gb(routed)} per token",
               f"hot experts on the GPU ({plan.hot_experts_per_layer}/{plan.experts_per_layer} per layer) take "
               f"{_gb(gpu_experts)}; the CPU reads {_gb(cpu_experts)} at {mem_read_gbps:.1f} GB/s"]
    if plan.expert_mode == "cache":
        explain.append(f"cache hit rate {hit:.0%}: {_gb(miss)} per token from disk" +
                       (f" at {disk_gbps:g} GB/s" if miss else ""))
    explain.append(f"GPU side (weights + full KV cache) reads {_gb(side)} per token " +
                   ("from RAM on the CPU" if plan.device == "cpu" else
                    f"at {gpu_gbps:g} GB/s" if gpu_gbps else "(no gpu_gbps given: not counted)"))
    if overlapped > 0:
        explain.append(f"ceiling {1 / overlapped:.2f} tok/s with stages overlapped, {1 / serial:.2f} tok/s "
                       f"summed; bottleneck: {worst}")
    else:  # every byte a token reads is on the GPU, whose bandwidth was not given
        worst = "gpu"
        explain.append("ceiling: not counted: every byte a token reads is on the GPU; pass gpu_gbps "
                       "(--gpu-gbps) for a figure")
    return {"routed_bytes_per_token": routed, "cpu_expert_bytes": cpu_experts, "gpu_expert_bytes": gpu_experts,
            "gpu_side_bytes": side, "disk_bytes": miss, "hit_rate": hit,
            "ram_s": terms["ram"], "disk_s": terms["disk"], "gpu_s": terms["gpu"],
            "tok_s": 1 / overlapped if overlapped else None, "tok_s_serial": 1 / serial if serial else None,
            "bottleneck": worst, "explain": explain}
