"""Engine: a loaded model you can call. Wires config + checkpoint + expert backend + model.

Owns turning what `hybrid.load` is given (resolved by hybrid.resolve) into a running engine, and the
non-expert weights into compute tensors. It does no math itself (model.py) and no rendering.
"""
from __future__ import annotations

import logging
import time
import weakref
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .chat import load_chat_template, render_chat
from .checkpoint import Checkpoint, CheckpointError
from .conversation import Done, apply_tool_choice, run_chat
from .generate import Sampler, Step, generate
from .model import AttnMode, ExpertBackend, Model
from .parser import Event
from .reference import ReferenceExperts
from .sampling import SamplingParams, sample
from .resolve import resolve_model
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}
PREFILL_CHUNK = 4096  # prompt tokens per forward pass: bounds activations (K2: ~0.2 GB of fp32 queries per 1K)


EMBED = "model.embed_tokens.weight"


def gpu_side_weight(name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype, int8: bool = False):
    """A non-expert checkpoint tensor as the model holds it, placed as the plan counts it:
    the router's bias in fp32 (F32 on disk; rounding it moves routing decisions), the embedding in
    host RAM as stored (a step needs one row: Model.embed), with int8 the plan's int8 weights
    (placement.int8_eligible) quantised on the host so the device never holds their bf16 copy, and
    the rest in `dtype` on `device`."""
    from kernels_gpu.int8 import quantize_int8

    from .placement import int8_eligible

    if name.endswith("e_score_correction_bias"):
        return t.to(device, torch.float32)
    if name == EMBED:
        return t.clone()  # host RAM, not a view: the checkpoint's maps close with the engine
    if int8 and int8_eligible(name, tuple(t.shape)):
        q, scale = quantize_int8(t)
        return q.to(device), scale.to(device)
    return t.to(device, dtype)


def int8_weights(weights: dict[str, torch.Tensor]) -> dict:
    """int8 weight-only copies of the plan's int8 tensors in a dict of dense weights (the rest as given)."""
    from kernels_gpu.int8 import quantize_int8

    from .placement import int8_eligible

    return {k: (quantize_int8(v) if int8_eligible(k, tuple(v.shape)) else v) for k, v in weights.items()}


class Engine:
    def __init__(self, ckpt: Checkpoint, experts: ExpertBackend, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, context: int = 4096, int8: bool = False):
        self.checkpoint = ckpt
        self.config = ckpt.config
        self.device = torch.device(device)
        # everything but the routed experts (and the embedding) goes to the compute device
        weights = {name: gpu_side_weight(name, ckpt.tensor(name), self.device, dtype, int8)
                   for name in ckpt.tensors if ".mlp.experts." not in name and not name.endswith("inv_freq")}
        self.model = Model(self.config, weights, experts)
        self.context = context
        self.tokenizer = Tokenizer.from_dir(ckpt.path)
        self.chat_template = load_chat_template(ckpt.path)
        self._cache = self.model.new_cache(context)  # persistent across requests, for prefix reuse
        self._cached_ids: list[int] = []  # the tokens whose KV the cache holds, in order
        self.plan = None  # the placement plan, set by load()
        self.hot_experts = 0  # per MoE layer, on the GPU side; set by load()
        self.prefill_chunk: int | None = PREFILL_CHUNK  # prompt tokens per forward pass; set by load()
        self.decoder = None  # a decode_step.StaticDecoder over the engine's cache, when decode graphs are on
        self._tokens = {"prefill": 0, "decode": 0}
        self._epoch = 0  # counts generate() calls; only the newest may touch the cache
        # threads and the slot arena belong to the backend: release them when the engine goes away
        self._finalizer = weakref.finalize(self, _release, experts, ckpt)

    # ---- statistics (bench) -----------------------------------------------------------------
    def reset_stats(self) -> None:
        self.model.times.clear()
        self._tokens = {"prefill": 0, "decode": 0}
        if hasattr(self.model.experts, "reset_stats"):
            self.model.experts.reset_stats()
        cache = getattr(self.model.experts, "cache", None)
        if cache is not None:
            cache.reset_stats()

    def stats(self) -> dict:
        """Where the time went since reset_stats(): GPU-side work, waits on the CPU experts, IO."""
        t = self.model.times
        ex = self.model.experts
        gpu_side = t["attention"] + t["router"] + t["shared"] + t["dense"] + t["lm_head"]
        out = {
            "forward_s": t["forward"], "gpu_side_s": gpu_side, "attention_s": t["attention"],
            "shared_s": t["shared"], "experts_wait_s": t["experts_wait"], "submit_s": t["submit"],
            "experts_compute_s": getattr(ex, "compute_s", 0.0), "io_wait_s": getattr(ex, "io_wait_s", 0.0),
            "expert_bytes": getattr(ex, "expert_bytes", 0), "tokens": dict(self._tokens),
            "io_s": 0.0, "bytes_read": 0, "cache": None,
            "decode_graphs": self._decode_graphs(),
        }
        out["overhead_s"] = max(0.0, t["forward"] - gpu_side - t["experts_wait"])
        cache = getattr(ex, "cache", None)
        if cache is not None:
            hits = sum(s.hits for s in cache.stats.values())
            misses = sum(s.misses for s in cache.stats.values())
            out["io_s"] = sum(s.io_s for s in cache.stats.values())
            out["bytes_read"] = sum(s.bytes_read for s in cache.stats.values())
            out["cache"] = {
                "slots": cache.n_slots, "hits": hits, "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
                "prefetched": sum(s.prefetched for s in cache.stats.values()),
                "prefetch_used": sum(s.prefetch_used for s in cache.stats.values()),
                "per_layer": {l: vars(s).copy() for l, s in cache.stats.items()},
            }
        return out

    def _decode_graphs(self) -> dict | None:
        """How single-token steps run: None (the plain forward), or the static decode step's state."""
        dec = self.decoder
        if dec is None:
            return None
        return {"cuda_graphs": dec.graphs, "captured_buckets": sorted(dec.chains), "steps": dec.steps}

    def close(self) -> None:
        """Stop the expert workers and IO threads and release the maps (also done when the engine is collected)."""
        self._finalizer()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.inference_mode()
    def logits(self, token_ids, attn: AttnMode = "auto") -> torch.Tensor:
        """A fresh full-sequence forward: token ids [T] -> fp32 logits [T, vocab]. No state is kept."""
        ids = self._check_ids(token_ids)
        cache = self.model.new_cache(ids.numel())
        return self.model.forward(ids, cache, attn=attn)


    def _check_ids(self, token_ids) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError(f"token_ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
        V = self.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ValueError(f"token ids must lie in [0, {V}); got {int(ids.min())}..{int(ids.max())}")
        return ids

    # ---- generation with KV prefix reuse ----------------------------------------------------
    def generate(self, token_ids: list[int], max_new_tokens: int, temperature: float = 1.0, seed: int | None = None,
                 *, sampling: SamplingParams | None = None, sampler: Sampler | None = None,
                 stop_ids: frozenset[int] = frozenset(), should_stop: Callable[[], bool] | None = None) -> Iterator[Step]:
        """Stream Steps. The KV cache keeps the longest common prefix with the previous request,
        so only the new tail of `token_ids` is prefilled (Step.prefill_tokens counts it).
        should_stop: asked between prefill chunks; True ends the request there (a client that left
        during a long prefill), keeping what was prefilled for the next request to reuse."""
        prompt = self._check_ids(token_ids).tolist()
        if len(prompt) >= self.context:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the context is {self.context}; "
                             "shorten it or raise the context (--context, or context= in hybrid.load)")
        params = sampling or SamplingParams(temperature=temperature, seed=seed)
        if sampler is None:
            gen = params.make_generator()
            sampler = lambda logits: sample(logits, params, gen)  # noqa: E731
        self.checkpoint.check_files()  # a shard shrunk under the map would be a SIGBUS, not an error
        if self.hot_experts:
            self.refresh_hot_experts()
        common = 0
        for a, b in zip(self._cached_ids, prompt):
            if a != b:
                break
            common += 1
        self._epoch += 1  # one cache, one live generation: a newer request supersedes this one
        epoch = self._epoch
        self._cache.truncate(common)
        self._cached_ids = self._cached_ids[:self._cache.length]
        generated: list[int] = []
        try:
            for step in generate(self.model, self._cache, prompt, max_new_tokens, sampler, stop_ids, self.prefill_chunk,
                                 should_stop, self.decoder.step if self.decoder else None):
                if step.index == 0:
                    self._tokens["prefill"] += step.prefill_tokens
                else:
                    self._tokens["decode"] += 1
                generated.append(step.token)
                yield step
                if self._epoch != epoch:
                    raise RuntimeError("this generation was superseded by a newer request on the same engine "
                                       "(the KV cache now holds that one); start it again")
        finally:  # also when the consumer stops early or a forward fails: keep ids and cache in step
            if self._epoch == epoch:
                self._cached_ids = (prompt + generated)[:self._cache.length]

    def refresh_hot_experts(self) -> None:
        """Keep the most-routed `hot_experts` experts of each MoE layer on the GPU side (uploads only changes)."""
        from kernels_gpu.int4 import DeviceInt4

        sched = self.model.experts
        for layer, counts in sched.route_counts.items():
            if not counts.any():
                continue
            want = [int(e) for e in np.argsort(-counts, kind="stable")[: self.hot_experts] if counts[e] > 0]
            old = sched.hot.get(layer, {})
            new = {}
            for e in want:
                if e in old:
                    new[e] = old[e]
                    continue
                ws = [self.checkpoint.expert(layer, e, p) for p in ("gate_proj", "up_proj", "down_proj")]
                new[e] = tuple(DeviceInt4.from_arrays(w.packed, w.scale, w.shape, self.device) for w in ws)
            sched.set_hot(layer, new)

    # ---- chat ---------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False, **kwargs) -> str | list[int]:
        """Render with the checkpoint's own chat_template.jinja; tokenize=True returns the ids."""
        if not tokenize:
            return render_chat(self.chat_template, messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
        # special-token strings inside user or tool text must stay text, never become control tokens
        mark = self.tokenizer.mark_user_text
        text = render_chat(self.chat_template, mark(messages), tools=mark(tools), add_generation_prompt=add_generation_prompt, **kwargs)
        return self.tokenizer.encode_chat(text)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: str | dict | None = "auto",
             **sampling) -> Iterator[Event | Done]:
        """Yield ReasoningDelta / ContentDelta / ToolCall / ToolCallError events, then one Done.

        tool_choice, as in the OpenAI API: 'auto' (the model decides), 'none' (the tools are not
        declared), 'required' (the answer is a call of one of them), or a function's name, or
        {"type": "function", "function": {"name": NAME}} (the answer calls that one). A required or
        named call starts the assistant's turn with K2's call prefix, so there is no reasoning."""
        if isinstance(tool_choice, dict):
            fn = tool_choice.get("function")
            if tool_choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f'tool_choice {tool_choice!r} must look like {{"type": "function", '
                                 '"function": {"name": NAME}}')
            mode, name = "named", fn["name"]  # a name, even one spelled like a keyword
        elif tool_choice is None or tool_choice in ("auto", "none", "required"):
            mode, name = tool_choice or "auto", None
        elif isinstance(tool_choice, str):
            mode, name = "named", tool_choice
        else:
            raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a function name, got {tool_choice!r}")
        tools, names, forced = apply_tool_choice(tools, messages, mode, name)
        max_tokens = sampling.pop("max_tokens", None)
        params = SamplingParams(**sampling, max_tokens=max_tokens)
        prompt = self.apply_chat_template(messages, tools=tools, tokenize=True)
        prompt += self.tokenizer.encode(forced, allow_special=True)
        budget = self.context - len(prompt)
        yield from run_chat(self, prompt, params, names, min(max_tokens or budget, budget), forced)


def load(model: str | Path = "tiny", *, backend: str = "auto", device: str = "auto", context: int = 4096,
         expert_mode: str = "auto", cache_slots: int | None = None, ram_budget: float | None = None,
         gpu_memory: float | None = None, cpu_threads: int | None = None, prefetch: bool | str = "auto",
         prefetch_width: int | None = None, cache_policy: str = "lrfu", io_threads: int = 2,
         trace: str | Path | None = None, defer_experts: int = 0, hot_experts: int | None = None,
         prefill_offload: str = "auto", decode_graphs: str = "auto", prefill_chunk: int = PREFILL_CHUNK,
         dtype: str = "auto") -> Engine:
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
    prefill_offload: for long prompts, upload a layer's experts to the GPU side and run its MoE there
    when that beats the CPU: 'auto' (from measured PCIe, CPU and GPU speeds; CUDA only), 'on'
    (every multi-token prefill; for testing), 'off'.
    dtype: the GPU side's compute and storage dtype: 'auto' (bfloat16 on CUDA, float32 on a CPU, where
    bf16 matmuls are slow), 'bfloat16' or 'float32'.
    prefill_chunk: prompt tokens per forward pass (a long prompt is prefilled in chunks, each attending
    to the cache the earlier ones wrote; the same logits, bounded memory).
    decode_graphs: decode through hybrid.decode_step (fixed shapes, segments between the CPU expert
    hops, each segment a CUDA graph on CUDA): 'auto' (on with CUDA when defer_experts is 0), 'on'
    (also without CUDA, where the same segments run eagerly), 'off' (the plain forward).
    """
    from .hardware import detect
    from .placement import plan as make_plan

    # option errors first, before anything large is opened or allocated
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
    if decode_graphs not in ("auto", "on", "off"):
        raise ValueError(f"decode_graphs must be 'auto', 'on' or 'off', got {decode_graphs!r}")
    if decode_graphs == "on" and defer_experts:
        raise ValueError("decode_graphs='on' does not combine with defer_experts (the deferred sum crosses the "
                         "graph segments); use one or the other")
    from .policy import POLICIES

    if cache_policy not in POLICIES:
        raise ValueError(f"cache_policy {cache_policy!r} is not known; choose one of {', '.join(POLICIES)}")
    for name, value in (("io_threads", io_threads), ("prefetch_width", prefetch_width), ("cache_slots", cache_slots),
                        ("prefill_chunk", prefill_chunk)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if backend == "reference" and (cache_slots is not None or expert_mode == "cache" or trace or hot_experts):
        raise ValueError("the reference backend computes every expert itself from the checkpoint: cache_slots, "
                         "expert_mode='cache', trace and hot_experts need backend='numba'")
    if trace is not None and not Path(trace).parent.is_dir():
        raise ValueError(f"trace: the folder of {trace} does not exist")
    ckpt = Checkpoint(resolve_model(model))
    cfg = ckpt.config
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
                     cpu_threads=cpu_threads, expert_mode=expert_mode, device=device, dtype=dtype)
    if backend == "auto":
        from kernels_cpu.simd import host_has_avx2

        backend = "numba" if host_has_avx2() else "reference"
    hot = plan.hot_experts_per_layer if hot_experts is None else hot_experts
    if hot and backend != "numba":
        raise ValueError("hot_experts needs the numba backend (the reference backend computes every expert itself)")
    if backend == "reference":
        experts: ExpertBackend = ReferenceExperts(ckpt)
    else:
        experts = _numba_backend(ckpt, plan, cache_slots, prefetch, prefetch_width, cache_policy, io_threads, trace)
    # as the plan counted it: bf16 on CUDA (int8 weights aside), fp32 on a CPU unless bf16 was asked for
    dtype = "bfloat16" if plan.device == "cuda" or plan.gpu_precision == "bf16" else "float32"
    try:
        engine = Engine(ckpt, experts, device=plan.device, dtype=DTYPES[dtype], context=context,
                        int8=plan.gpu_precision == "int8")
    except BaseException:  # IO threads, file descriptors and the slot arena must not outlive a failed load
        if hasattr(experts, "close"):
            experts.close()
        ckpt.close()
        raise
    engine.model.defer_experts = defer_experts
    engine.prefill_chunk = prefill_chunk
    if decode_graphs == "on" or (decode_graphs == "auto" and plan.device == "cuda" and not defer_experts):
        from .decode_step import StaticDecoder

        engine.decoder = StaticDecoder(engine.model, engine._cache)
    engine.plan = plan
    engine.hot_experts = hot
    model = engine.model  # closures below hold the model, never the engine (its finalizer frees the backend)
    if getattr(experts, "prefetch", False):  # the next layer's router predicts what to prefetch
        experts.predict = lambda layer, x, k: model.route(layer, x, k)[0]
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
    """The long-prompt rule of kernels_gpu.offload from speeds measured on this machine (CUDA only):
    PCIe at the first decision, the GPU's matmul rate, and the CPU experts' rate as prefills run."""
    from kernels_gpu.offload import PrefillSpeeds, expert_flops_per_token, measure_pcie_gbps, prefill_on_gpu

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


def _release(experts, ckpt: Checkpoint) -> None:
    if hasattr(experts, "close"):
        experts.close()
    ckpt.close()


def _numba_backend(ckpt: Checkpoint, plan, cache_slots, prefetch, prefetch_width, cache_policy, io_threads, trace):
    from .expert_cache import ExpertCache
    from .experts import mmap_tables
    from .scheduler import Scheduler

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
