"""hybrid.load: from a path or preset and the user's options to a running Engine.

Owns validating the options up front, planning placement (placement.plan on the measured machine),
building the expert backend (reference, or the Numba scheduler over mmap or the RAM cache) and wiring
the GPU-side extras the plan and options ask for (hot experts, long-prompt upload, decode graphs).
No math (model.py), no generation (engine.py).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from hybrid.checkpoint.reader import Checkpoint
from hybrid.runtime.engine import PREFILL_CHUNK, Engine
from hybrid.runtime.hardware import MAX_IO_THREADS, MAX_THREADS
from hybrid.model.k2 import ExpertBackend, Model
from hybrid.experts.reference import ReferenceExperts
from hybrid.runtime.resolve import resolve_model
from hybrid.experts.routing_stats import default_path, load_counts

log = logging.getLogger(__name__)
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


def load(model: str | Path = "tiny", *, backend: str = "auto", device: str = "auto", context: int = 4096,
         expert_mode: str = "auto", cache_slots: int | None = None, ram_budget: float | None = None,
         gpu_memory: float | None = None, cpu_threads: int | None = None, prefetch: bool | str = "auto",
         prefetch_width: int | None = None, cache_policy: str = "lrfu", io_threads: int = 2,
         trace: str | Path | None = None, defer_experts: int = 0, hot_experts: int | None = None,
         prefill_offload: str = "auto", decode_graphs: str = "auto", prefill_chunk: int = PREFILL_CHUNK,
         dtype: str = "auto", routing_stats: str | Path | None = "auto", gpu_precision: str = "auto") -> Engine:
    """Open a checkpoint (directory or preset name), plan placement, and return an Engine.

    backend: 'numba' (INT4 kernels over mmap'd shards or the RAM expert cache), 'reference'
    (torch, dequantised fp32; the oracle), or 'auto' (numba where the CPU has AVX2).
    device: where the "GPU side" runs: 'cuda', 'cpu' (fp32) or 'auto' (the planner: CUDA when present).
    expert_mode: 'mmap', 'cache' (RAM slots fed by explicit reads; cache_slots overrides the
    planned count) or 'auto' (the planner decides from RAM). ram_budget / gpu_memory in GB.
    prefetch: load the next layer's predicted experts during this layer (cache mode, decode): True,
    False, or 'auto' (on while at least 30% of what it loads gets used, measured as it runs).
    trace: write routing decisions as JSON lines to this file (scripts/replay_traces.py reads it).
    defer_experts: add the N lowest-weight experts of each MoE layer one layer later (KTransformers'
    deferral: more overlap, slightly different outputs; 0, the default, is exact).
    hot_experts: routed experts per MoE layer kept on the GPU side and computed there from the INT4
    layout (default: as many as the plan's spare VRAM allows; none without a GPU). Chosen from the
    routing counts so far, refreshed at the start of each request.
    routing_stats: a file that keeps the routing counts across sessions, so the hot experts are chosen
    at load, before the first request: 'auto' (with hot experts on CUDA, one file per checkpoint
    under the cache directory), a path, or None (counts start afresh each session).
    prefill_offload: for long prompts, upload a layer's experts to the GPU side and run its MoE there
    when that beats the CPU: 'auto' (from measured PCIe, CPU and GPU speeds; CUDA only), 'on'
    (every multi-token prefill; for testing), 'off'.
    dtype: the GPU side's compute dtype: 'auto' (bfloat16 on CUDA; float32 on a CPU, where bf16 matmuls
    are slow, with the linear weights kept in bf16 as stored and widened inside each product),
    'bfloat16' or 'float32'.
    gpu_precision: storage of the big GPU-side linears: on CUDA 'auto' (bf16 when it fits with the KV
    cache, else int8 weight-only), 'bf16' or 'int8' (half the VRAM, leaving room for context or hot
    experts; one byte read per weight in a decode step). On a CPU 'auto' (bf16 weights, fp32 math) or
    'int8' (int8 weights, fp32 math: half the RAM and bytes again, int8's rounding); 'bf16' is refused.
    prefill_chunk: prompt tokens per forward pass (a long prompt is prefilled in chunks, each attending
    to the cache the earlier ones wrote; the same logits, bounded memory).
    decode_graphs: decode through hybrid.runtime.decode_step (fixed shapes; on CUDA one graph per token, the
    CPU expert hops inside it as host functions): 'auto' (on with CUDA when defer_experts is 0), 'on'
    (also without CUDA, where the same step runs eagerly), 'segments' (a graph per segment, the host
    hopping between them: two launches per MoE layer; what 'auto'/'on' fall back to where the token
    step cannot run, see StaticDecoder.token_blocker), 'off' (the plain forward).
    """
    from hybrid.runtime.hardware import detect
    from hybrid.runtime.placement import plan as make_plan

    # option errors first, before anything large is opened or allocated
    if not isinstance(model, (str, Path)):
        raise ValueError(f"model must be a checkpoint directory, a preset name or a Hugging Face repo id, got {model!r}")
    if trace is not None and not isinstance(trace, (str, Path)):
        raise ValueError(f"trace must be a file path or None, got {trace!r}")
    if expert_mode not in ("auto", "mmap", "cache"):
        raise ValueError(f"expert_mode must be 'auto', 'mmap' or 'cache', got {expert_mode!r}")
    if prefetch not in (True, False, "auto"):
        raise ValueError(f"prefetch must be True, False or 'auto', got {prefetch!r}")
    if backend not in ("auto", "numba", "reference"):
        raise ValueError(f"backend {backend!r} is not known; use 'numba', 'reference' or 'auto'")
    if prefill_offload not in ("auto", "on", "off"):
        raise ValueError(f"prefill_offload must be 'auto', 'on' or 'off', got {prefill_offload!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if decode_graphs not in ("auto", "on", "segments", "off"):
        raise ValueError(f"decode_graphs must be 'auto', 'on', 'segments' or 'off', got {decode_graphs!r}")
    if decode_graphs in ("on", "segments") and defer_experts:
        raise ValueError(f"decode_graphs={decode_graphs!r} does not combine with defer_experts (the deferred sum "
                         "crosses the graph segments); use one or the other")
    from hybrid.experts.policy import POLICIES

    if cache_policy not in POLICIES:
        raise ValueError(f"cache_policy {cache_policy!r} is not known; choose one of {', '.join(POLICIES)}")
    # (name, value, lowest, highest, None allowed)
    for name, value, low, high, optional in (
            ("io_threads", io_threads, 1, MAX_IO_THREADS, False), ("cpu_threads", cpu_threads, 1, MAX_THREADS, True),
            ("prefetch_width", prefetch_width, 1, None, True), ("cache_slots", cache_slots, 1, None, True),
            ("prefill_chunk", prefill_chunk, 1, None, False), ("context", context, 1, None, False),
            ("hot_experts", hot_experts, 0, None, True), ("defer_experts", defer_experts, 0, None, False)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            span = f"in {low}..{high}" if high is not None else f">= {low}"
            raise ValueError(f"{name} must be an integer {span}, got {value!r}")
    if backend == "reference" and (cache_slots is not None or expert_mode == "cache" or trace or hot_experts
                                   or routing_stats not in ("auto", None)):
        raise ValueError("the reference backend computes every expert itself from the checkpoint: cache_slots, "
                         "expert_mode='cache', trace, hot_experts and routing_stats need backend='numba'")
    if not (routing_stats is None or isinstance(routing_stats, (str, Path))):
        raise ValueError(f"routing_stats must be 'auto', a file path or None, got {routing_stats!r}")
    if trace is not None and not Path(trace).parent.is_dir():
        raise ValueError(f"trace: the folder of {trace} does not exist")
    if routing_stats not in ("auto", None) and not Path(routing_stats).parent.is_dir():
        raise ValueError(f"routing_stats: the folder of {routing_stats} does not exist; create it, or pass 'auto' "
                         "for a file under the cache directory")
    ckpt = Checkpoint(resolve_model(model))
    cfg = ckpt.config
    try:  # the options that need the config, then the plan: a refusal closes what was opened
        n_experts = cfg.n_routed_experts * len(cfg.moe_layers)
        if cache_slots is not None and cache_slots > n_experts:
            raise ValueError(f"cache_slots {cache_slots} exceeds the model's {n_experts} routed experts; "
                             f"use at most {n_experts} (or expert_mode='mmap' when they all fit in RAM)")
        if not 0 <= defer_experts < cfg.num_experts_per_tok:
            raise ValueError(f"defer_experts must lie in 0..{cfg.num_experts_per_tok - 1}, got {defer_experts}")
        if hot_experts is not None and not 0 <= hot_experts <= cfg.n_routed_experts:
            raise ValueError(f"hot_experts must lie in 0..{cfg.n_routed_experts}, got {hot_experts}")
        if cache_slots is not None:
            expert_mode = "cache"
        plan = make_plan(cfg, detect(), gpu_memory=gpu_memory, ram_budget=ram_budget, context=context,
                         cpu_threads=cpu_threads, expert_mode=expert_mode, device=device, dtype=dtype,
                         gpu_precision=gpu_precision)
        if backend == "auto":
            from kernels_cpu.simd import host_has_avx2

            backend = "numba" if host_has_avx2() else "reference"
        hot = plan.hot_experts_per_layer if hot_experts is None else hot_experts
        if hot and backend != "numba":
            raise ValueError("hot_experts needs the numba backend (the reference backend computes every expert itself)")
    except BaseException:
        ckpt.close()
        raise
    if backend == "reference":
        experts: ExpertBackend = ReferenceExperts(ckpt)
    else:
        experts = _numba_backend(ckpt, plan, cache_slots, prefetch, prefetch_width, cache_policy, io_threads, trace)
    # as the plan counted it: bf16 on CUDA (int8 weights aside); on a CPU fp32 math over bf16 weights
    # unless bf16 was asked for
    dtype = "bfloat16" if plan.device == "cuda" or plan.gpu_precision == "bf16" else "float32"
    try:
        engine = Engine(ckpt, experts, device=plan.device, dtype=DTYPES[dtype], context=context,
                        int8=plan.gpu_precision in ("int8", "int8w"), bf16w=plan.gpu_precision in ("bf16w", "int8w"))
    except BaseException:  # IO threads, file descriptors and the slot arena must not outlive a failed load
        if hasattr(experts, "close"):
            experts.close()
        ckpt.close()
        raise
    engine.model.defer_experts = defer_experts
    engine.prefill_chunk = prefill_chunk
    engine.plan = plan
    engine.hot_experts = hot
    model = engine.model  # closures below hold the model, never the engine (its finalizer frees the backend)
    if getattr(experts, "prefetch", False):  # the next layer's router predicts what to prefetch
        experts.predict = lambda layer, x, k: model.route(layer, x, k)[0]
    if routing_stats == "auto":
        routing_stats = default_path(ckpt.path) if hot and plan.device == "cuda" else None
    if routing_stats is not None and backend != "numba":  # 'auto' picked the reference backend (no AVX2)
        log.warning("routing_stats ignored: the reference backend keeps no routing counts")
    elif routing_stats is not None:
        engine.routing_stats = Path(routing_stats)
        saved = load_counts(engine.routing_stats, cfg.moe_layers, cfg.n_routed_experts)
        if saved is not None:
            experts.route_counts.update(saved)  # what earlier sessions routed: the hot set, chosen now
    if hot:
        engine.refresh_hot_experts()  # the per-layer buffers, filled from the saved counts if any
    if decode_graphs in ("on", "segments") or (decode_graphs == "auto" and plan.device == "cuda" and not defer_experts):
        from hybrid.runtime.decode_step import StaticDecoder

        engine.decoder = StaticDecoder(engine.model, engine._cache, mode="segments" if decode_graphs == "segments" else "auto")
    if backend == "numba" and (prefill_offload == "on" or (prefill_offload == "auto" and plan.device == "cuda")):
        from kernels_cpu.table import PARTS

        experts.fetch = lambda layer, e: [ckpt.array(f"model.layers.{layer}.mlp.experts.{e}.{part}") for part in PARTS]
        experts.offload = (lambda n_tokens, n_experts: True) if prefill_offload == "on" else _measured_offload(model)
        if plan.device == "cuda":  # two upload buffers must fit in the VRAM the plan leaves over
            spare = plan.gpu_budget - plan.gpu_bytes
            experts.upload_group = min(experts.upload_group, spare // (2 * plan.slot_bytes))
            if experts.upload_group < 1:
                experts.offload = None
                log.info("long-prompt expert upload off: %.2f GB of VRAM left, two experts need more", spare / 1e9)
    return engine


def _measured_offload(model: Model):
    """The long-prompt rule of hybrid.experts.upload from speeds measured on this machine (CUDA only):
    PCIe at the first decision, the GPU's matmul rate, and the CPU experts' rate as prefills run."""
    from hybrid.experts.upload import PrefillSpeeds, expert_flops_per_token, measure_pcie_gbps, prefill_on_gpu

    cfg, sched = model.cfg, model.experts
    flops_tok = expert_flops_per_token(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok)
    expert_bytes = sched.tables[cfg.moe_layers[0]].expert_nbytes
    speeds: dict = {}

    def decide(n_tokens: int, n_experts: int) -> bool:
        if not speeds:
            a = torch.randn(4096, 4096, device=model.device, dtype=torch.bfloat16)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(4):
                a @ a
            torch.cuda.synchronize()
            # dequantising INT4 runs well below the dense rate: count half of it
            speeds.update(pcie=measure_pcie_gbps() or 0.0, gpu=0.5 * 4 * 2 * 4096**3 / (time.perf_counter() - t0))
        toks = sched.cpu_prefill_tokens
        cpu_tps = toks / sched.cpu_prefill_s if sched.cpu_prefill_s else 0.0
        if cpu_tps == 0.0:
            return False  # measure the CPU on this prefill first
        return prefill_on_gpu(n_tokens, PrefillSpeeds(speeds["pcie"], cpu_tps, speeds["gpu"]), n_experts,
                              expert_bytes, flops_tok)

    return decide


def _numba_backend(ckpt: Checkpoint, plan, cache_slots, prefetch, prefetch_width, cache_policy, io_threads, trace):
    from hybrid.experts.cache import ExpertCache
    from hybrid.experts.mmap_tables import mmap_tables
    from hybrid.experts.scheduler import Scheduler

    cfg = ckpt.config
    trace_file = open(trace, "w") if trace else None  # noqa: SIM115 (closed by Scheduler.close)
    width = prefetch_width or 2 * cfg.num_experts_per_tok
    if plan.expert_mode == "cache":
        slots = cache_slots or plan.cache_slots
        cache = ExpertCache(ckpt, slots, io_threads=io_threads, policy=cache_policy)
        return Scheduler(cfg.moe_layers, cache=cache, prefetch_width=width if prefetch else 0,
                         adaptive_prefetch=prefetch == "auto",
                         trace=trace_file, threads=plan.cpu_threads)
    return Scheduler(cfg.moe_layers, tables=mmap_tables(ckpt), trace=trace_file, threads=plan.cpu_threads)
