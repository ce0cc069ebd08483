"""hybrid.load: from a path or preset and the user's options to a running Engine.

Owns checking the options up front (options.LoadOptions), planning placement (placement.plan on the
measured machine), building the expert backend (reference, or the Numba scheduler over mmap or the RAM
cache) and wiring the GPU-side extras the plan and options ask for (hot experts, long-prompt upload,
decode graphs). No math (model.py), no generation (engine.py).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from hybrid.checkpoint.config import ModelConfig
from hybrid.checkpoint.reader import Checkpoint
from hybrid.runtime.engine import PREFILL_CHUNK, Engine
from hybrid.runtime.placement import Plan
from hybrid.cluster.figures import measure_gbps
from hybrid.cluster.head import connect
from hybrid.experts.backend import ExpertBackend
from hybrid.experts.build import ExpertOptions, build_backend
from hybrid.experts.ram_tables import copy_share
from hybrid.experts.upload import UPLOAD_GROUP
from hybrid.runtime.options import DEFAULT_KEEP, SPECS, LoadOptions
from hybrid.runtime.kv_store import KVSizes, KVStore
from hybrid.runtime.prefix_disk import DiskPrefixCache, KVLayout
from hybrid.cluster.identity import checkpoint_identity
from hybrid.runtime.resolve import PresetMaker, resolve_model
from hybrid.experts.routing_stats import default_path, load_counts
from hybrid.model.linear import check_prompt_math

log = logging.getLogger(__name__)


def load(model: str | Path = "tiny", *, backend: str = "auto", device: str = "auto", context: int | None = None,
         expert_mode: str = "auto", cache_slots: int | None = None, ram_budget: float | None = None,
         gpu_memory: float | None = None, cpu_threads: int | None = None, prefetch: bool | str = "auto",
         prefetch_width: int | None = None, cache_policy: str = "lrfu", io_threads: int = 2,
         trace: str | Path | None = None, defer_experts: int = 0, hot_experts: int | None = None,
         prefill_offload: str = "auto", decode_graphs: str = "auto", prefill_chunk: int = PREFILL_CHUNK,
         dtype: str = "auto", routing_stats: str | Path | None = "auto", gpu_precision: str = "auto",
         cpu_prompt_math: str = "fp32", nodes: int = 1, listen: str | None = None, token: str | None = None,
         node_timeout: float = 60.0, join_timeout: float = 600.0, listen_any: bool = False, keep_conversations: int = DEFAULT_KEEP,
         kv_spill_tokens: int | None = None, prefix_cache_dir: str | Path | None = None,
         prefix_cache_gb: float = 20.0, kv_dtype: str = "bf16", presets: Mapping[str, PresetMaker] | None = None) -> Engine:
    """Open a checkpoint (directory or preset name), plan placement, and return an Engine.

    backend: 'numba' (INT4 kernels over mmap'd shards or the RAM expert cache), 'reference'
    (torch, dequantised fp32; the oracle), or 'auto' (numba where the CPU has AVX2).
    device: where the "GPU side" runs: 'cuda', 'cpu' (fp32) or 'auto' (the planner: CUDA when present).
    context: tokens the KV cache holds; None (the default): the plan's choice (hybrid.runtime.context: the
    longest of 4K-128K whose KV pages take <= 10% of the VRAM budget, or of the RAM available without a GPU,
    keeping bf16 weights where they fit), as engine.context and engine.plan.context_why say.
    expert_mode: 'mmap' (the page cache holds the experts), 'ram' (copied at load: experts/ram_tables.py),
    'cache' (RAM slots fed by explicit reads; cache_slots overrides the planned count) or 'auto' (mmap or
    cache, as the planner finds RAM). ram_budget / gpu_memory in GB.
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
    cpu_prompt_math: where the GPU side runs on the CPU, the math of its prompt products (more than
    kernels_cpu.widen.MAX_ROWS tokens): 'fp32' (the weights widened, exact up to summation order) or
    'bf16' (activations rounded to bf16, bf16 products with fp32 sums rounded to bf16: llama.cpp's
    numerics for bf16 weights, ~1.3x the prompt speed on k2-slice; needs AVX512_BF16 or AMX, refused
    elsewhere and on CUDA). Decode steps, the router and the attention math stay fp32.
    prefill_chunk: prompt tokens per forward pass (a long prompt is prefilled in chunks, each attending
    to the cache the earlier ones wrote; the same logits, bounded memory).
    decode_graphs: decode through hybrid.runtime.decode_step (fixed shapes; on CUDA one graph per token, the
    CPU expert hops inside it as host functions): 'auto' (on with CUDA when defer_experts is 0), 'on'
    (also without CUDA, where the same step runs eagerly), 'segments' (a graph per segment, the host
    hopping between them: two launches per MoE layer; what 'auto'/'on' fall back to where the token
    step cannot run, see StaticDecoder.token_blocker), 'off' (the plain forward).
    nodes, listen, token, node_timeout, join_timeout, listen_any: several machines as one (hybrid.cluster.head.connect).
    keep_conversations, kv_spill_tokens, prefix_cache_dir, prefix_cache_gb, kv_dtype: the paged KV store
    (runtime/kv_store.py): room for earlier conversations, the host tier, the disk tier across restarts.
    presets: the built-in checkpoints by name, each made on first use (hybrid.load passes hybrid.synth's;
    see hybrid.runtime.resolve).
    """
    # every option checked up front, before anything large is opened or allocated (runtime/options.py)
    options = LoadOptions(**{k: v for k, v in locals().items() if k in SPECS})  # every keyword but presets
    ckpt = Checkpoint(resolve_model(model, presets))
    cfg = ckpt.config
    try:  # the options that need the config, then the plan: a refusal closes what was opened
        options.check_config(cfg)
        plan = plan_for(cfg, options)
        check_prompt_math(cpu_prompt_math, plan.device)
        if backend == "auto":
            from kernels_cpu.simd import host_has_avx2

            backend = "numba" if host_has_avx2() else "reference"
        hot = plan.hot_experts_per_layer if hot_experts is None else hot_experts
        if hot and backend != "numba":
            raise ValueError("hot_experts needs the numba backend (the reference backend computes every expert itself)")
    except BaseException:
        ckpt.close()
        raise
    return _engine(ckpt, plan, options, backend, hot)


def plan_for(cfg: ModelConfig, options: LoadOptions) -> Plan:
    """The placement plan load() makes for these options on this machine (the server asks it first, to choose
    its context)."""
    from hybrid.runtime.hardware import detect
    from hybrid.runtime.placement import plan as make_plan

    o = options
    return make_plan(cfg, detect(), gpu_memory=o.gpu_memory, ram_budget=o.ram_budget, context=o.context,
                     cpu_threads=o.cpu_threads, expert_mode="cache" if o.cache_slots is not None else o.expert_mode,
                     device=o.device, dtype=o.dtype, gpu_precision=o.gpu_precision,
                     keep_conversations=o.keep_conversations, kv_spill_tokens=o.kv_spill_tokens, kv_dtype=o.kv_dtype)


def _engine(ckpt: Checkpoint, plan: Plan, options: LoadOptions, backend: str, hot: int) -> Engine:
    """The expert backend, built complete, then the engine over it; a failure releases what was built.
    backend: 'numba' or 'reference' ('auto' resolved); hot: hot experts per MoE layer (plan or option)."""
    stats_path, saved = _routing_stats(ckpt, plan, options.routing_stats, backend, hot)
    offload, group = _prefill_offload(plan, backend, options.prefill_offload)
    # the head of a cluster copies its share in ram mode, known once the nodes have joined (_cluster): mmap till then
    head_ram = options.nodes > 1 and plan.expert_mode == "ram"
    opts = ExpertOptions(kind=backend, device=plan.device, expert_mode="mmap" if head_ram else plan.expert_mode,
                         cache_slots=options.cache_slots or plan.cache_slots, io_threads=options.io_threads,
                         cache_policy=options.cache_policy, cpu_threads=plan.cpu_threads,
                         prefetch=options.prefetch if options.nodes == 1 else False,
                         prefetch_width=options.prefetch_width or 0,
                         trace=Path(options.trace) if options.trace else None, hot_experts=hot,
                         prefill_offload=offload, upload_group=group)
    graphs, defer = options.decode_graphs, options.defer_experts
    decode_mode = None  # the plain forward for single-token steps
    if graphs in ("on", "segments") or (graphs == "auto" and plan.device == "cuda" and not defer):
        decode_mode = "segments" if graphs == "segments" else "auto"
    # as the plan counted it: bf16 on CUDA (int8 weights aside); on a CPU fp32 math over bf16 weights
    # unless bf16 was asked for
    dtype = torch.bfloat16 if plan.device == "cuda" or plan.gpu_precision == "bf16" else torch.float32
    # prefetch guesses with the next layer's router: the model's own, built over this backend below
    # (the lambda reads `model` when it runs, after the engine exists; it holds the model, never the
    # engine, whose finalizer frees the backend)
    predict = lambda layer, x, k: model.route(layer, x, k)[0]  # noqa: E731
    try:
        experts = build_backend(ckpt, opts, predict, saved)
    except BaseException:
        ckpt.close()
        raise
    if options.nodes > 1:
        experts = _cluster(ckpt, experts, options, head_ram)
    try:
        engine = Engine(ckpt, experts, device=plan.device, dtype=dtype, context=plan.context,
                        int8=plan.gpu_precision in ("int8", "int8w"), bf16w=plan.gpu_precision in ("bf16w", "int8w"),
                        plan=plan, prefill_chunk=options.prefill_chunk, defer_experts=defer,
                        decode_mode=decode_mode, routing_stats=stats_path, kv=_kv_store(ckpt, plan, options, dtype),
                        prompt_math=options.cpu_prompt_math)
    except BaseException:  # IO threads, file descriptors and the slot arena must not outlive a failed load
        experts.close()
        ckpt.close()
        raise
    model = engine.model
    return engine


def _kv_store(ckpt: Checkpoint, plan: Plan, options: LoadOptions, compute_dtype: torch.dtype) -> KVStore:
    """The engine's paged KV store as the plan sized it, with the disk tier when a directory was given."""
    cfg = ckpt.config
    disk = None
    if options.prefix_cache_dir is not None:
        layout = KVLayout(cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, plan.kv_dtype)
        ident = checkpoint_identity(ckpt)
        disk = DiskPrefixCache(Path(options.prefix_cache_dir).expanduser(), (ident.config + ident.index + ident.data).hex(),
                               layout, int(options.prefix_cache_gb * 1e9))
    dtype = torch.bfloat16 if plan.kv_dtype == "bfloat16" else torch.float32
    return KVStore(cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, plan.context,
                   KVSizes.for_tokens(plan.kv_pool_tokens, plan.kv_spill_tokens), plan.device, dtype, compute_dtype,
                   disk)


def _cluster(ckpt: Checkpoint, local: ExpertBackend, options: LoadOptions, ram: bool) -> ExpertBackend:
    """The head's backend over options.nodes machines (local computes the head's share); waits for the
    nodes to join. ram: then copy the head's share of the plan into this process (ram_tables.copy_share). A
    failure closes what was built and the checkpoint."""
    cluster = None
    try:
        # the head's read speed on the threads its experts get: placement weighs it against the nodes'
        cluster = connect(ckpt, local, options.nodes, options.listen, options.token, options.node_timeout,
                          options.join_timeout, options.listen_any, head_gbps=measure_gbps(options.cpu_threads))
        if ram:
            copy_share(local.mapped_tables, cluster.plan.held_by(0))
        return cluster
    except BaseException:
        (cluster or local).close()
        ckpt.close()
        raise


def _routing_stats(ckpt: Checkpoint, plan: Plan, routing_stats: str | Path | None, backend: str,
                   hot: int) -> tuple[Path | None, dict | None]:
    """-> (the file routing counts persist in, or None; the counts it holds, which choose the hot
    experts at load, or None). 'auto': one file per checkpoint, with hot experts on CUDA only."""
    if routing_stats == "auto":
        routing_stats = default_path(ckpt.path) if hot and plan.device == "cuda" else None
    if routing_stats is None:
        return None, None
    if backend != "numba":  # 'auto' picked the reference backend (no AVX2)
        log.warning("routing_stats ignored: the reference backend keeps no routing counts")
        return None, None
    path = Path(routing_stats)
    return path, load_counts(path, ckpt.config.moe_layers, ckpt.config.n_routed_experts)


def _prefill_offload(plan: Plan, backend: str, prefill_offload: str) -> tuple[str, int]:
    """The long-prompt expert upload as the backend takes it: ('on' | 'measured' | 'off', experts per upload).
    'auto' measures (CUDA only); on CUDA two upload buffers must fit in the VRAM the plan leaves over."""
    if backend != "numba" or prefill_offload == "off" or (prefill_offload == "auto" and plan.device != "cuda"):
        return "off", UPLOAD_GROUP
    mode = "on" if prefill_offload == "on" else "measured"
    if plan.device != "cuda":
        return mode, UPLOAD_GROUP
    spare = plan.gpu_budget - plan.gpu_bytes
    group = min(UPLOAD_GROUP, spare // (2 * plan.slot_bytes))
    if group < 1:
        log.info("long-prompt expert upload off: %.2f GB of VRAM left, two experts need more", spare / 1e9)
        return "off", UPLOAD_GROUP
    return mode, group
