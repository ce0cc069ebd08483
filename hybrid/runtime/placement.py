"""The placement planner: model config + measured machine + user options -> a frozen `Plan`.

Owns what lives where (GPU / RAM / mmap'd page cache / RAM expert cache) and in which precision, from
the bytes of each class of tensor (tensor_classes.py); refuses a plan that cannot fit, naming the short
budget, the shortfall and the option that fixes it, before anything large is allocated. It allocates
nothing and reads no weights; everything else reads the Plan and nothing else decides placement.
GB = 10^9 bytes. Option names in messages are the CLI flags (plan()'s keywords with dashes).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from hybrid.checkpoint.config import ModelConfig
from hybrid.runtime.hardware import GB, Disk, Hardware
from hybrid.runtime.context import COW_TOKENS, default_context, ram_room
from hybrid.runtime.options import DEFAULT_CONTEXT, DEFAULT_KEEP, KEEP_TOKENS, PAGE_SIZE, check
from hybrid.runtime.tensor_classes import GPU_SIDE, INT8_CLASSES, ClassSizes, class_sizes

log = logging.getLogger(__name__)

GPU_RESERVE = int(1.5 * GB)  # CUDA context, cuBLAS workspace, prefill activations, allocator slack
MIN_POOL_TOKENS = 8192  # the fewest KV positions kept on the GPU when the rest of the context goes to host RAM
SLOT_ALIGN = 4096  # cache slots are O_DIRECT targets

LABELS = {"attention": "attention (MLA)", "router": "router", "shared_experts": "shared experts",
          "dense_mlp": "dense MLP layers", "norms": "norms", "lm_head": "lm_head", "embedding": "embedding",
          "kv_cache": "KV cache", "kv_spill": "KV cache, host tier", "hot_experts": "hot experts", "routed_experts": "routed experts"}


def ram_reserve(ram_total: int) -> int:
    """RAM kept free for the OS, Python, torch, Numba and transient buffers: 2 GB + 2% of RAM."""
    return int(2 * GB + 0.02 * ram_total)


class PlanError(ValueError):
    """The plan does not fit: `budget` ('VRAM', 'RAM' or 'disk') is short by `short_bytes`."""

    def __init__(self, budget: str, short_bytes: int, detail: str):
        self.budget, self.short_bytes = budget, int(short_bytes)
        super().__init__(f"{budget} is short by {short_bytes / GB:.2f} GB: {detail}")


@dataclass(frozen=True)
class Entry:
    what: str  # a key of LABELS
    where: str  # 'gpu' | 'ram' | 'mmap' | 'cache'
    precision: str  # 'bf16' | 'int8' | 'fp32' (a CPU's KV cache) | 'int4' | 'bf16w' / 'int8w' (a CPU: those
    # weights, fp32 math; see widen_eligible)
    nbytes: int
    detail: str = ""  # e.g. '8,192 tokens' or '4,887 slots of 23,040'


@dataclass(frozen=True)
class Plan:
    device: str  # 'cuda' | 'cpu': where the "GPU side" runs
    gpu_precision: str  # storage of the big GPU-side linears: 'bf16' | 'int8' (cuda), 'bf16w' | 'int8w' | 'bf16' (cpu)
    entries: tuple[Entry, ...]
    context: int  # tokens the KV cache holds (given, or chosen by runtime/context.py's rule)
    kv_bytes_per_token: int
    expert_mode: str  # 'mmap' / 'ram': all routed experts resident (page cache / a copy at load); 'cache': slots
    expert_bytes: int  # one routed expert as on disk (INT4 + bf16 scales); a hot expert takes the same
    slot_bytes: int  # one cache slot: expert_bytes rounded up to SLOT_ALIGN
    cache_slots: int  # TOTAL slots, one pool shared by all MoE layers; 0 in mmap mode
    hot_experts_per_layer: int  # on the GPU, the same count in every MoE layer
    n_moe_layers: int
    experts_per_layer: int
    experts_per_token: int
    expert_bytes_per_token: int  # routed bytes one decoded token reads (= size_report's figure)
    cpu_threads: int
    numa_nodes: int
    gpu_index: int | None  # CUDA device the plan is for; None on cpu
    gpu_budget: int  # bytes the plan may use on the GPU; 0 on cpu
    ram_budget: int  # bytes for routed experts: page cache (mmap) or slots (cache)
    ram_available: int
    ram_reserve: int
    disk: Disk | None = None  # the checkpoint's filesystem when plan() was given checkpoint_dir
    kv_pool_tokens: int = 0  # KV positions in the compute device's page pool (live + kept conversations)
    kv_spill_tokens: int = 0  # KV positions of the live conversation that may move to host RAM
    kv_dtype: str = "bfloat16"  # the KV pages' dtype
    keep_conversations: int = DEFAULT_KEEP
    context_why: str = ""  # one line: the context as given, or what the rule chose and why

    # ---- formatting helpers --------------------------------------------------------------
    def entry(self, what: str) -> Entry:
        return next(e for e in self.entries if e.what == what)

    @property
    def gpu_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries if e.where == "gpu")

    @property
    def ram_bytes(self) -> int:
        """RAM the plan fills, expert page cache or slots included (not the reserve)."""
        return sum(e.nbytes for e in self.entries if e.where != "gpu")

    @property
    def slots_per_layer(self) -> float:
        return self.cache_slots / self.n_moe_layers if self.n_moe_layers else 0.0

    def rows(self) -> list[tuple[str, str, str, float]]:
        """(what, where, precision, GB) per tensor class, for a table."""
        return [(LABELS[e.what] + (f" ({e.detail})" if e.detail else ""), e.where, e.precision, e.nbytes / GB)
                for e in self.entries]

    def summary(self) -> str:
        side = (f"GPU side on GPU {self.gpu_index}" if self.device == "cuda" else
                "no CUDA GPU: attention, router and shared experts on the CPU")
        experts = (f"{self.expert_mode}, all resident in RAM" if self.expert_mode != "cache" else
                   f"cache, {self.cache_slots:,} slots ({self.slots_per_layer:.1f}/layer) of "
                   f"{self.n_moe_layers * self.experts_per_layer:,}")
        gpu = f"{self.gpu_bytes / GB:.2f}/{self.gpu_budget / GB:.2f} GB VRAM, " if self.device == "cuda" else ""
        hot = f"hot experts {self.hot_experts_per_layer}/layer; " if self.device == "cuda" else ""
        return (f"{side} in {self.gpu_precision}; routed experts: {experts}; {hot}{gpu}"
                f"{self.ram_bytes / GB:.2f} GB RAM of {self.ram_available / GB:.2f} available; "
                f"context {self.context:,}; {self.cpu_threads} CPU threads")


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def _itemise(parts: dict[str, int]) -> str:
    """'attention (MLA) 12.34 GB + ...', leaving out what rounds to 0.00 GB (all of it, for a tiny model:
    then the sum, so the sentence never has a hole)."""
    shown = " + ".join(f"{LABELS.get(k, k)} {_gb(v)}" for k, v in parts.items() if v >= 0.005 * GB)
    return shown or f"the model's other needs ({sum(parts.values()) / 1e6:,.1f} MB)"


# ---- the planner ----------------------------------------------------------------------------

def plan(cfg: ModelConfig, hw: Hardware, *, gpu_memory: float | None = None, ram_budget: float | None = None,
         context: int | None = None, cpu_threads: int | None = None, gpu_precision: str = "auto",
         expert_mode: str = "auto", hot_experts: int | None = None, device: str = "auto",
         checkpoint_dir: str | Path | None = None, dtype: str = "auto", keep_conversations: int = DEFAULT_KEEP,
         kv_spill_tokens: int | None = None, kv_dtype: str = "bf16") -> Plan:
    """Place every tensor class of `cfg` on `hw`.

    gpu_memory: GB of VRAM the plan may use (default: free VRAM of GPU 0 minus GPU_RESERVE).
    ram_budget: GB for routed experts (default: available RAM minus the RAM-side needs and
        ram_reserve()); 'auto' expert mode is 'mmap' when all routed experts fit in it, else 'cache'.
    gpu_precision: 'auto' = bf16 if it fits with the KV cache, else int8 weight-only; the CPU as
        "GPU side" computes in fp32 over its bf16 weights ('bf16w', see widen_eligible), or over int8
        ones where 'int8' is asked for ('int8w': half the bytes again, int8's rounding).
    hot_experts: per MoE layer on the GPU (None = all that fit). context: None = from the plan (runtime/context.py).
    checkpoint_dir: when given, the part of the checkpoint not yet there must fit on its disk.
    dtype: the GPU side's dtype when it runs on the CPU: 'auto' or 'float32' (fp32), 'bfloat16';
        on CUDA it is bf16 (int8 where gpu_precision says), so 'float32' is refused there.
    keep_conversations, kv_spill_tokens, kv_dtype: the KV store (runtime/kv_store.py). Its compute-device
        pool holds the context plus keep_conversations earlier conversations of up to KEEP_TOKENS each;
        on a GPU too small for that, the pool holds what the VRAM left over allows (at least
        MIN_POOL_TOKENS) and the rest of the context spills to host RAM (kv_spill_tokens: that many,
        whatever the plan would say).
    """
    dev, threads = _check(cfg, hw, context=context, device=device, dtype=dtype, gpu_precision=gpu_precision,
                          cpu_threads=cpu_threads, gpu_memory=gpu_memory, ram_budget=ram_budget,
                          expert_mode=expert_mode, hot_experts=hot_experts)
    sizes = class_sizes(cfg)
    n_moe, E, K = len(cfg.moe_layers), cfg.n_routed_experts, cfg.num_experts_per_tok
    expert_bytes = sizes.routed_bytes // max(1, n_moe * E)
    slot_bytes = -(-expert_bytes // SLOT_ALIGN) * SLOT_ALIGN
    expert_dtype = f"int{cfg.quant.num_bits}" if cfg.quant else "bf16"  # as on disk
    kv_values = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # MLA latent + rope key
    # the GPU side on the CPU: bf16 math, or fp32 math over bf16 (or, asked for, int8) linear weights
    cpu_precision = "bf16" if dtype == "bfloat16" else "int8w" if gpu_precision == "int8" else "bf16w"
    if kv_dtype == "fp32" and dev == "cuda":
        raise ValueError("--kv-dtype fp32 is for the CPU; on CUDA the KV cache is bf16 (leave --kv-dtype out)")
    kv_per_token = kv_values * (4 if kv_dtype == "fp32" else 2)  # bf16 pages on every device unless fp32 is asked for
    context, why = _context(context, cfg, hw, sizes, dev, cpu_precision, kv_per_token, keep_conversations,
                            kv_spill_tokens, hot_experts, gpu_memory, gpu_precision, ram_budget, expert_mode)
    want_pool = context + keep_conversations * min(context, KEEP_TOKENS)

    # -- the GPU side ---------------------------------------------------------------------
    gpu_budget = hot = 0
    if dev == "cuda":
        precision, gpu_budget, pool = _fit_gpu(sizes, hw, gpu_memory, gpu_precision, context, kv_per_token, want_pool)
        left = gpu_budget - sum(sizes.nbytes(w, precision) for w in GPU_SIDE) - pool * kv_per_token
        hot = _fit_hot(hot_experts, left, n_moe, E, expert_bytes)
    else:
        precision, pool = cpu_precision, want_pool
        if hot_experts:
            raise ValueError("hot_experts needs a CUDA GPU")
        if gpu_memory is not None:
            log.warning("--gpu-memory ignored: the GPU side runs on the CPU")
    pool, spill, kv_entries = _kv_pages(dev, pool, want_pool, context, kv_spill_tokens, kv_per_token,
                                        2 * kv_values, keep_conversations)
    entries = _side_entries(sizes, "gpu" if dev == "cuda" else "ram", precision) + kv_entries
    if dev == "cuda":
        entries.append(Entry("hot_experts", "gpu", expert_dtype, hot * n_moe * expert_bytes,
                             f"{hot}/layer x {n_moe} layers"))
    entries.append(Entry("embedding", "ram", "bf16", sizes.nbytes("embedding", "bf16")))

    # -- the RAM side: what is left after `needs` holds the routed experts ----------------------
    needs = {e.what: e.nbytes for e in entries if e.where == "ram"}
    mode, budget, slots = _fit_ram(sizes, hw, needs, ram_budget, expert_mode, 2 * K * slot_bytes, slot_bytes, dev,
                                   precision)
    detail = ("page cache, all resident" if mode == "mmap" else "copied at load, all resident" if mode == "ram" else
              f"{slots:,} slots of {n_moe * E:,}, {slots / max(1, n_moe):.1f}/layer")
    entries.append(Entry("routed_experts", mode, expert_dtype,
                         sizes.routed_bytes if mode != "cache" else slots * slot_bytes, detail))

    p = Plan(device=dev, gpu_precision=precision, entries=tuple(entries), context=context,
             kv_bytes_per_token=kv_per_token, expert_mode=mode, expert_bytes=expert_bytes, slot_bytes=slot_bytes,
             cache_slots=slots, hot_experts_per_layer=hot, n_moe_layers=n_moe, experts_per_layer=E, context_why=why,
             experts_per_token=K, expert_bytes_per_token=expert_bytes * K * n_moe, cpu_threads=threads,
             numa_nodes=hw.numa_nodes, gpu_index=0 if dev == "cuda" else None, gpu_budget=gpu_budget,
             ram_budget=budget, ram_available=hw.ram_available, ram_reserve=ram_reserve(hw.ram_total),
             disk=_check_disk(sizes, hw, checkpoint_dir, mode), kv_pool_tokens=pool, kv_spill_tokens=spill,
             kv_dtype="float32" if kv_dtype == "fp32" else "bfloat16", keep_conversations=keep_conversations)
    log.info("plan: %s", p.summary())
    return p


def _check(cfg: ModelConfig, hw: Hardware, *, context: int | None, device: str, dtype: str, gpu_precision: str,
           cpu_threads: int | None, **shared: object) -> tuple[str, int]:
    """plan()'s option checks, the values by hybrid.load's own specs (options.py), then how they combine
    on `hw`; returns (where the GPU side runs, CPU threads for the experts)."""
    check(context=context, device=device, dtype=dtype, gpu_precision=gpu_precision, cpu_threads=cpu_threads,
          **shared)
    if context is not None and context > cfg.max_position_embeddings:
        raise ValueError(f"--context {context} must lie in 1..{cfg.max_position_embeddings} (max_position_embeddings)")
    if device == "cuda" and not hw.gpus:
        raise ValueError("device 'cuda' asked for, but no CUDA GPU was detected (to plan a machine with one, "
                         "pass --gpu-gb)")
    dev = "cuda" if device == "cuda" or (device == "auto" and hw.gpus) else "cpu"
    if dev == "cuda" and dtype == "float32":
        raise ValueError("dtype 'float32' is for a GPU side on the CPU; on CUDA it is bf16 (or int8 weights): "
                         "leave dtype at 'auto' or pick device 'cpu'")
    if dev == "cpu" and gpu_precision == "bf16":
        raise ValueError("gpu_precision 'bf16' needs a CUDA GPU; without one the GPU side runs on the CPU, its "
                         "weights in bf16 with fp32 math ('bf16w', the default); use --gpu-precision auto (or int8)")
    if dev == "cpu" and gpu_precision == "int8" and dtype == "bfloat16":
        raise ValueError("gpu_precision 'int8' on the CPU computes in fp32; leave dtype at 'auto' or 'float32'")
    threads = cpu_threads if cpu_threads is not None else hw.threads
    if threads > hw.logical_cores:
        log.warning("cpu_threads %d exceeds the %d logical cores; expect slower experts", threads, hw.logical_cores)
    return dev, threads


def _context(context: int | None, cfg: ModelConfig, hw: Hardware, sizes: ClassSizes, dev: str, side: str, kv: int,
             keep: int, spill: int | None, hot: int | None, gpu_memory: float | None, gpu_precision: str,
             ram_budget: float | None, expert_mode: str) -> tuple[int, str]:
    """(context, why): as given, or (None) runtime/context.py's rule over this plan's numbers. On CUDA its pages'
    room is the VRAM budget less the hot experts asked for and the GPU side's weights at the precision the shortest
    context gets (bf16 stays where it fits there); on a CPU, what the RAM side leaves (context.ram_room)."""
    if context is not None:
        return context, f"context {context:,} as given (--context)"
    floor, window = min(DEFAULT_CONTEXT, cfg.max_position_embeddings), cfg.max_position_embeddings
    expert_bytes = sizes.routed_bytes // max(1, len(cfg.moe_layers) * cfg.n_routed_experts)  # as plan() has it
    min_cache = 2 * cfg.num_experts_per_tok * -(-expert_bytes // SLOT_ALIGN) * SLOT_ALIGN  # top-k + a prefetch, slots
    if dev == "cuda":
        p, budget, _ = _fit_gpu(sizes, hw, gpu_memory, gpu_precision, floor, kv, floor)
        room = budget - sum(sizes.nbytes(w, p) for w in GPU_SIDE) - (hot or 0) * len(cfg.moe_layers) * expert_bytes
        return default_context(kv, budget, "VRAM budget", window, room, keep, f"room for {p} GPU-side weights")
    needs = ram_reserve(hw.ram_total) + sum(e.nbytes for e in _side_entries(sizes, "ram", side)) + \
        sizes.nbytes("embedding", "bf16") + (spill or 0) * kv
    room, room_for = ram_room(hw.ram_available - needs, sizes.routed_bytes, (floor + keep * min(floor, KEEP_TOKENS)
                              + COW_TOKENS) * kv, expert_mode, ram_budget, min_cache)
    return default_context(kv, hw.ram_available, "RAM available", window, room, keep, room_for)


def _fit_hot(hot_experts: int | None, left: int, n_moe: int, E: int, expert_bytes: int) -> int:
    """Hot experts per MoE layer in the `left` bytes of VRAM (the same count in every MoE layer)."""
    fit = min(E, left // (n_moe * expert_bytes)) if n_moe else 0
    if hot_experts is not None and hot_experts > fit:
        raise PlanError("VRAM", (hot_experts - fit) * n_moe * expert_bytes,
                        f"--hot-experts {hot_experts} needs {_gb(hot_experts * n_moe * expert_bytes)} but "
                        f"{_gb(left)} is left after the GPU-side weights and KV cache; use --hot-experts "
                        f"{fit} or less (or --context / --gpu-precision int8 to free VRAM)")
    return fit if hot_experts is None else hot_experts


def _side_entries(sizes: ClassSizes, where: str, precision: str) -> list[Entry]:
    """The GPU side's classes `where` it runs; with int8 only INT8_CLASSES are int8."""
    side = {w: precision if precision not in ("int8", "int8w") or w in INT8_CLASSES else
            "bf16" if precision == "int8" else "bf16w" for w in GPU_SIDE}
    return [Entry(w, where, side[w], sizes.nbytes(w, side[w])) for w in GPU_SIDE]


def _kv_pages(dev: str, pool: int, want_pool: int, context: int, spill_asked: int | None, kv_per_token: int,
              bf16_per_token: int, keep: int) -> tuple[int, int, list[Entry]]:
    """(pool tokens, host-tier tokens, their entries): the compute device's KV pool in whole pages (rounded
    down where the VRAM decided it), and the host tier holding the rest of the context (or as asked)."""
    whole = dev == "cpu" or pool >= context  # the context fits: whole pages, and the copy-on-write page
    pool = -(-pool // PAGE_SIZE) * PAGE_SIZE + COW_TOKENS if whole else pool // PAGE_SIZE * PAGE_SIZE
    spill = (0 if whole else context - pool + COW_TOKENS) if spill_asked is None else spill_asked
    spill = -(-spill // PAGE_SIZE) * PAGE_SIZE
    if pool + spill < context:
        raise PlanError("VRAM" if dev == "cuda" else "RAM", (context - pool - spill) * kv_per_token,
                        f"--kv-spill-tokens {spill:,} and the {pool:,} tokens of the compute device's pool hold "
                        f"less than --context {context:,}; raise --kv-spill-tokens to {context - pool:,} or leave it out")
    precision = "bf16" if kv_per_token == bf16_per_token else "fp32"
    held = (f"{pool:,} tokens: the context and {keep} earlier conversations of up to "
            f"{min(context, KEEP_TOKENS):,}" if pool >= want_pool and keep else
            f"{context:,} tokens, and a page for copy-on-write" if whole else
            f"{pool:,} tokens of the context, the rest in host RAM")
    entries = [Entry("kv_cache", "gpu" if dev == "cuda" else "ram", precision, pool * kv_per_token, held)]
    if spill:
        entries.append(Entry("kv_spill", "ram", precision, spill * kv_per_token,
                             f"{spill:,} tokens of the live conversation"))
    return pool, spill, entries


def _check_disk(sizes: ClassSizes, hw: Hardware, checkpoint_dir: str | Path | None, mode: str) -> Disk | None:
    """The checkpoint's filesystem (None without checkpoint_dir): the part not there yet must fit on it."""
    disk = hw.disk_for(checkpoint_dir) if checkpoint_dir is not None else None
    if disk is None:
        return None
    d = Path(checkpoint_dir)
    present = sum(f.stat().st_size for f in d.glob("*.safetensors")) if d.is_dir() else 0
    missing = max(0, sizes.disk_bytes - present)
    if missing > disk.free_bytes:
        raise PlanError("disk", missing - disk.free_bytes,
                        f"the checkpoint needs {_gb(sizes.disk_bytes)} and {_gb(missing)} of it is not in "
                        f"{checkpoint_dir} yet, but its filesystem has {_gb(disk.free_bytes)} free; "
                        "choose a checkpoint directory on a larger disk")
    if mode == "cache" and disk.rotational:
        log.warning("expert cache misses will be read from a rotational disk (%s): expect well under 1 tok/s",
                    disk.device)
    return disk


def _fit_ram(sizes: ClassSizes, hw: Hardware, needs: dict[str, int], ram_budget: float | None, want: str,
             min_cache: int, slot_bytes: int, dev: str, precision: str) -> tuple[str, int, int]:
    """(expert mode, expert budget, cache slots); min_cache = the current layer's top-k + a prefetched next."""
    avail, reserve, need = hw.ram_available, ram_reserve(hw.ram_total), sum(needs.values())
    int8w = sum(sizes.nbytes(w, "int8w" if w in INT8_CLASSES else "bf16w") for w in GPU_SIDE)
    int8_hint = f", or --gpu-precision int8 ({_gb(int8w)}, int8's rounding)" if precision == "bf16w" else ""
    side_note = (f"; without a CUDA GPU the GPU-side weights are held in RAM "
                 f"({_gb(sum(needs.get(w, 0) for w in GPU_SIDE))}): use a machine with a GPU or more RAM{int8_hint}"
                 if dev == "cpu" else "")
    ctx_note = ", or a smaller --context" if needs.get("kv_cache", 0) > 0.05 * need else ""
    budget = avail - need - reserve if ram_budget is None else int(ram_budget * GB)
    if ram_budget is not None and need + budget + reserve > avail:
        fits = math.floor((avail - need - reserve) / GB * 10) / 10  # rounded down: the figure named must fit
        fix = (f"use --ram-budget {fits:.1f} or less{ctx_note}" if fits * GB >= min_cache
               else side_note[2:] or "free some RAM")
        raise PlanError("RAM", need + budget + reserve - avail,
                        f"--ram-budget {ram_budget:g} GB plus {_itemise(needs)} and the {_gb(reserve)} kept free "
                        f"exceeds the {_gb(avail)} available; {fix}")
    mode = want if want != "auto" else ("mmap" if sizes.routed_bytes <= budget else "cache")
    if mode != "cache" and sizes.routed_bytes > budget:
        raise PlanError("RAM", sizes.routed_bytes - budget,
                        f"--expert-mode {mode} needs all routed experts ({_gb(sizes.routed_bytes)}) resident but "
                        f"the expert budget is {_gb(max(0, budget))}; use --expert-mode cache (or auto){side_note}")
    if mode == "cache" and budget < min_cache:
        minimum = f"expert cache minimum ({min_cache // slot_bytes} slots)"
        if ram_budget is not None:
            raise PlanError("RAM", min_cache - budget, f"--ram-budget {ram_budget:g} GB is below the {minimum} of "
                            f"{_gb(min_cache)}; use --ram-budget {math.ceil(min_cache / GB * 10) / 10:g} or more")
        parts = dict(needs, **{minimum: min_cache, "reserve": reserve})
        raise PlanError("RAM", min_cache - budget, f"needs {_itemise(parts)} = {_gb(sum(parts.values()))}, "
                        f"{_gb(avail)} available{side_note or '; free some RAM'}{ctx_note}")
    slots = 0 if mode != "cache" else min(sizes.n_experts, budget // slot_bytes)
    return mode, max(0, budget), slots


def _fit_gpu(sizes: ClassSizes, hw: Hardware, gpu_memory: float | None, want: str, context: int,
             kv_per_token: int, want_pool: int) -> tuple[str, int, int]:
    """(precision, VRAM budget, KV pool positions): bf16 when its weights fit with the context's KV pages,
    else int8 ('auto'); the pool with room for the kept conversations where that fits too, else the
    context, else what is left (at least MIN_POOL_TOKENS, the rest of the context spilling to host RAM)."""
    g = hw.gpus[0]
    default = g.free_bytes - GPU_RESERVE
    if gpu_memory is None:
        budget = default
    else:
        budget = int(gpu_memory * GB)
        if budget > g.free_bytes:
            raise PlanError("VRAM", budget - g.free_bytes,
                            f"--gpu-memory {gpu_memory:g} GB asked for, but GPU 0 ({g.name}) has "
                            f"{_gb(g.free_bytes)} free; use --gpu-memory {default / GB:.1f} or less")
    weights = {p: sum(sizes.nbytes(w, p) for w in GPU_SIDE) for p in ("bf16", "int8")}
    tries = ("bf16", "int8") if want == "auto" else (want,)
    for p in tries:  # precision first: bf16 with the context alone beats int8 with room for kept conversations
        for tokens in (want_pool, context):
            if weights[p] + (tokens + COW_TOKENS) * kv_per_token <= budget:
                return p, budget, tokens
    floor = min(context, MIN_POOL_TOKENS)
    for p in sorted(tries, key=weights.get):  # some of the context in host RAM: the smaller weights spill less
        if weights[p] + floor * kv_per_token <= budget:
            return p, budget, (budget - weights[p]) // kv_per_token
    best = tries[-1]
    kv = floor * kv_per_token
    need = weights[best] + kv
    fixes = []
    if want == "bf16" and weights["int8"] + kv <= budget:
        fixes.append("--gpu-precision int8 (or auto)")
    if gpu_memory is not None and budget < default:
        fixes.append(f"--gpu-memory up to {default / GB:.1f}")
    fixes.append(f"a GPU with {_gb(need + GPU_RESERVE)} free, or --device cpu")
    where = (f"--gpu-memory {gpu_memory:g}" if gpu_memory is not None else
             f"GPU 0 {g.name}: {_gb(g.free_bytes)} free, minus {_gb(GPU_RESERVE)} reserve")
    raise PlanError("VRAM", need - budget,
                    f"the GPU side needs {_gb(need)} (weights in {best} {_gb(weights[best])} + KV pages for "
                    f"{floor:,} tokens {_gb(kv)}, the rest of the context in host RAM) but the VRAM budget is "
                    f"{_gb(budget)} ({where}); "
                    f"fix: {'; '.join(fixes)}")
