"""What a placement Plan can do at best: the batch-1 decode ceiling from the bytes one token reads in
each stage (RAM, disk, GPU) over that stage's bandwidth, measured, given or typical; and what would move
that ceiling (more RAM, a faster disk, more RAM bandwidth, int8), each change re-planned and re-projected.

Owns the projection only (kimi-hybrid plan renders it); it decides nothing about placement (placement.py)
and measures nothing (probe.py). GB = 10^9 bytes.
"""
from __future__ import annotations

import math
from dataclasses import replace

from hybrid.checkpoint.config import ModelConfig
from hybrid.runtime.hardware import DISK_TYPES, GB, Hardware
from hybrid.runtime.placement import GPU_RESERVE, GPU_SIDE, Plan, PlanError
from hybrid.runtime.placement import plan as make_plan
from hybrid.runtime.tensor_classes import class_sizes

PCIE_GBPS = 25.0  # a typical PCIe 4.0 x16 host-to-device copy, for the host tier of the KV cache
PROJECT_TOKENS = 8192  # the conversation length a projection reads KV pages for, unless the context is shorter


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def gbps(x: float) -> str:
    """A bandwidth as people write it: '1,000', '300', '57.6', '1.56' (never '1.55624')."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def projected_decode_tps(plan: Plan, cfg: ModelConfig, mem_read_gbps: float, disk_gbps: float | None = None,
                         hit_rate: float | None = None, gpu_gbps: float | None = None,
                         kv_tokens: int | None = None) -> dict:
    """Decode ceiling (batch 1) from bytes per token over bandwidth, stage by stage.

    Routed bytes per token = experts_per_token x MoE layers x one expert (size_report's figure). Hot
    experts take hot/E of them off the CPU (uniform routing assumed). Cache misses come from disk:
    hit_rate defaults to the cache's share of all experts (what i.i.d. routing would give; replayed
    traces give the real figure). The KV term reads kv_tokens positions of the conversation (default: the
    context, up to PROJECT_TOKENS: a typical conversation; a longer context adds a line with its own
    figure, the host tier's PCIe reads included). On a CPU-only plan the GPU-side
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
    hit = 1.0 if plan.expert_mode != "cache" else capacity if hit_rate is None else hit_rate
    if not 0 <= hit <= 1:
        raise ValueError(f"hit_rate must lie in 0..1, got {hit}")
    miss = int(cpu_experts * (1 - hit))
    n_kv = min(plan.context, PROJECT_TOKENS) if kv_tokens is None else kv_tokens
    # a token reads the live conversation's KV pages once (the kept ones it does not); past the pool, over PCIe
    on_device = min(n_kv, plan.kv_pool_tokens or n_kv)
    side = sum(e.nbytes for e in plan.entries if e.what in GPU_SIDE) + on_device * plan.kv_bytes_per_token
    if miss and not disk_gbps:
        raise ValueError(f"cache misses read {_gb(miss)} per token from disk; pass disk_gbps")
    terms: dict[str, float | None] = {"disk": miss / (disk_gbps * GB) if miss else 0.0}
    if plan.device == "cpu":
        terms.update(ram=(cpu_experts + side) / (mem_read_gbps * GB), gpu=0.0)
    else:
        terms.update(ram=cpu_experts / (mem_read_gbps * GB), gpu=(side + gpu_experts) / (gpu_gbps * GB) if gpu_gbps else None)
        spilled = (n_kv - on_device) * plan.kv_bytes_per_token
        if spilled:  # the host tier's pages cross PCIe for every token
            terms["pcie"] = spilled / (PCIE_GBPS * GB)
    known = {k: v for k, v in terms.items() if v is not None}
    worst = max(known, key=known.get)
    serial, overlapped = sum(known.values()), known[worst]
    explain = [f"routed experts: {plan.experts_per_token} x {plan.n_moe_layers} layers x "
               f"{plan.expert_bytes / 1e6:.1f} MB = {_gb(routed)} per token"]
    if plan.device == "cpu":  # no GPU: every byte below is read from RAM by the same cores
        explain.append(f"the CPU reads them at {gbps(mem_read_gbps)} GB/s")
    else:
        explain.append(f"hot experts on the GPU ({plan.hot_experts_per_layer}/{plan.experts_per_layer} per layer) "
                       f"take {_gb(gpu_experts)}; the CPU reads {_gb(cpu_experts)} at {gbps(mem_read_gbps)} GB/s")
    if plan.expert_mode == "cache":
        explain.append(f"cache hit rate {hit:.0%}: {_gb(miss)} per token from disk" +
                       (f" at {gbps(disk_gbps)} GB/s" if miss else ""))
    if terms.get("pcie"):
        explain.append(f"{_gb(spilled)} of KV pages come from host RAM over PCIe (typical "
                       f"{PCIE_GBPS:g} GB/s): {terms['pcie'] * 1e3:.0f} ms per token")
    kv_words = f"KV pages of {n_kv:,} tokens"
    explain.append(f"non-expert weights + {kv_words}: {_gb(side)} per token, read from RAM too" if plan.device == "cpu"
                   else f"GPU side (weights + {kv_words}) reads {_gb(side)} per token " +
                   (f"at {gbps(gpu_gbps)} GB/s" if gpu_gbps else "(no gpu_gbps given: not counted)"))
    if overlapped > 0:
        explain.append(f"ceiling {1 / overlapped:.2f} tok/s with stages overlapped, {1 / serial:.2f} tok/s "
                       f"summed; bottleneck: {worst}")
    else:  # every byte a token reads is on the GPU, whose bandwidth was not given
        worst = "gpu"
        explain.append("ceiling: not counted: every byte a token reads is on the GPU; pass gpu_gbps "
                       "(--gpu-gbps) for a figure")
    if kv_tokens is None and plan.context > n_kv:  # the same at the end of a conversation as long as the context
        full = projected_decode_tps(plan, cfg, mem_read_gbps, disk_gbps, hit_rate, gpu_gbps, plan.context)
        pcie = [line for line in full["explain"] if "over PCIe" in line]
        if full["tok_s"]:
            explain.append(f"at the full context of {plan.context:,} tokens: {full['tok_s']:.2f} tok/s" +
                           (f" ({pcie[0]})" if pcie else ""))
    return {"routed_bytes_per_token": routed, "cpu_expert_bytes": cpu_experts, "gpu_expert_bytes": gpu_experts,
            "gpu_side_bytes": side, "disk_bytes": miss, "hit_rate": hit,
            "ram_s": terms["ram"], "disk_s": terms["disk"], "gpu_s": terms["gpu"],
            "tok_s": 1 / overlapped if overlapped else None, "tok_s_serial": 1 / serial if serial else None,
            "bottleneck": worst, "explain": explain}


# ---- what would move the bottleneck (kimi-hybrid plan's last lines) ------------------------------------

def _tok_s(proj: dict) -> str:
    return "not counted (GPU bandwidth unknown)" if proj["tok_s"] is None else f"~{proj['tok_s']:,.2f} tok/s"


def _ram_for_all_experts(cfg: ModelConfig, hw: Hardware, plan_kw: dict) -> tuple[Hardware, Plan]:
    """The least whole-GB RAM with which every routed expert is resident (mmap), and that plan."""
    more = 0
    for _ in range(8):  # the reserve grows with RAM (2%): a few rounds reach the fixed point
        bigger = replace(hw, ram_total=hw.ram_total + more, ram_available=hw.ram_available + more)
        try:
            return bigger, make_plan(cfg, bigger, **dict(plan_kw, expert_mode="mmap", ram_budget=None))
        except PlanError as e:
            if e.budget != "RAM":
                raise
            more += math.ceil(e.short_bytes / GB) * int(GB)
    raise PlanError("RAM", 0, "no amount of RAM was found to hold every expert")


def what_would_help(cfg: ModelConfig, hw: Hardware, plan_kw: dict, plan: Plan, proj: dict, mem_gbps: float,
                    disk_gbps: float | None, gpu_gbps: float | None, hit_rate: float | None = None) -> list[dict]:
    """What would move the bottleneck and by how much, each change alone, projected as projected_decode_tps
    projects `plan` (same bandwidths and hit_rate unless the change is one). plan_kw: the keywords `plan` was made with.
    Each item: kind ('ram' | 'disk' | 'mem_bw' | 'int8'), its figures, tok_s and a sentence."""
    out: list[dict] = []
    bw = dict(disk_gbps=disk_gbps, gpu_gbps=gpu_gbps, hit_rate=hit_rate)
    if plan.expert_mode == "cache":
        bigger, p = _ram_for_all_experts(cfg, hw, plan_kw)
        ram_gb = math.ceil(bigger.ram_total / GB)
        q = projected_decode_tps(p, cfg, mem_gbps, gpu_gbps=gpu_gbps)
        more = ram_gb - math.ceil(hw.ram_total / GB)
        what = (f"{ram_gb:,} GB of RAM (+{more:,}): every routed expert fits" if more > 0 else
                "every routed expert already fits this RAM: --expert-mode auto and no --ram-budget")
        out.append(dict(kind="ram", ram_gb=ram_gb, tok_s=q["tok_s"], text=(
            f"{what}, none read from disk: {_tok_s(q)} at the same {gbps(mem_gbps)} GB/s")))
    if proj["disk_s"]:
        faster = next((v for v in sorted(DISK_TYPES.values()) if v > disk_gbps), 2 * disk_gbps)
        name = next((k for k, v in DISK_TYPES.items() if v == faster), "two such disks striped")
        q = projected_decode_tps(plan, cfg, mem_gbps, **dict(bw, disk_gbps=faster))
        out.append(dict(kind="disk", disk_gbps=faster, tok_s=q["tok_s"], text=(
            f"a faster disk ({name}, ~{gbps(faster)} GB/s instead of {gbps(disk_gbps)}): {_tok_s(q)}")))
    if proj["bottleneck"] == "ram":
        q = projected_decode_tps(plan, cfg, 2 * mem_gbps, **bw)
        out.append(dict(kind="mem_bw", mem_gbps=2 * mem_gbps, tok_s=q["tok_s"], text=(
            f"twice the RAM bandwidth ({gbps(2 * mem_gbps)} GB/s: twice the memory channels, or faster DIMMs): "
            f"{_tok_s(q)}")))
    if plan.gpu_precision in ("bf16", "bf16w"):
        try:
            p = make_plan(cfg, hw, **dict(plan_kw, gpu_precision="int8"))
        except PlanError:
            p = None
        if p is not None:
            q = projected_decode_tps(p, cfg, mem_gbps, **bw)
            hot = (f", hot experts {plan.hot_experts_per_layer} -> {p.hot_experts_per_layer} per layer"
                   if p.device == "cuda" else "")
            side = "the GPU side" if p.device == "cuda" else "the non-expert weights"
            out.append(dict(kind="int8", gpu_side_gb=q["gpu_side_bytes"] / GB, tok_s=q["tok_s"], text=(
                f"int8 for {side} (--gpu-precision int8): weights + KV cache {_gb(proj['gpu_side_bytes'])} "
                f"-> {_gb(q['gpu_side_bytes'])}{hot}: {_tok_s(q)}; outputs may differ slightly from bf16")))
    return out


def int8_note(cfg: ModelConfig, plan: Plan, asked: str) -> str | None:
    """Why 'auto' chose int8 for the GPU side and what that changes; None when it did not."""
    if asked != "auto" or plan.device != "cuda" or plan.gpu_precision != "int8":
        return None
    sizes = class_sizes(cfg)
    bf16 = sum(sizes.nbytes(w, "bf16") for w in GPU_SIDE)
    kv = plan.context * plan.kv_bytes_per_token
    longest = (plan.gpu_budget - bf16) // plan.kv_bytes_per_token
    keep = (f"--gpu-precision bf16 with --context {longest - longest % 1024:,} or less keeps bf16"
            if longest >= 1024 else "a GPU with more memory keeps bf16")
    return (f"int8 chosen automatically for the GPU side: in bf16 its weights ({_gb(bf16)}) and the KV cache for "
            f"{plan.context:,} tokens ({_gb(kv)}) exceed the {_gb(plan.gpu_budget)} VRAM budget; int8 weight-only "
            f"halves the big linears. Outputs may differ slightly from bf16 (int8's rounding); {keep}.")


def other_gpus_help(cfg: ModelConfig, hw: Hardware, plan: Plan, mem_gbps: float, disk_gbps: float | None,
                    gpu_gbps: float | None, hit_rate: float | None = None) -> list[dict]:
    """What each GPU past GPU 0 would add if it held hot experts (kimi-hybrid runs on GPU 0 only and leaves
    the others idle): the experts its free VRAM (less GPU_RESERVE) holds per MoE layer, projected as if
    GPU 0 held them (the hot experts' bytes join the GPU term: a lower bound on what two GPUs would do)."""
    out: list[dict] = []
    if plan.device != "cuda":
        return out
    hot = plan.hot_experts_per_layer
    for i, g in enumerate(hw.gpus[1:], start=1):
        extra = max(0, min(plan.experts_per_layer - hot,
                           (g.free_bytes - GPU_RESERVE) // (plan.n_moe_layers * plan.expert_bytes)))
        hot += extra
        q = projected_decode_tps(replace(plan, hot_experts_per_layer=hot), cfg, mem_gbps, disk_gbps=disk_gbps,
                                 hit_rate=hit_rate, gpu_gbps=gpu_gbps)
        worth = (f"as hot experts it would hold {extra} more per layer ({hot}/{plan.experts_per_layer} with GPU "
                 f"0's): {_tok_s(q)}" if extra else "it would add nothing: no expert is left for it to hold" if
                 hot == plan.experts_per_layer else "its free VRAM holds no more hot experts")
        out.append(dict(kind="gpu", gpu=i, hot_experts_per_layer=hot, tok_s=q["tok_s"],
                        text=f"GPU {i} ({g.total_bytes / GB:,.0f} GB) stays idle: kimi-hybrid runs on GPU 0; {worth}"))
    return out
