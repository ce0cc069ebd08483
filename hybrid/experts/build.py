"""build_backend: an expert backend built complete from a checkpoint and plain options.

Owns turning ExpertOptions into a backend: the reference oracle, or the Numba Scheduler with its
pieces (mmap tables, their copy in RAM or the RAM cache, CPU worker, prefetch, hot experts filled from
saved routing counts, long-prompt upload, trace). Nothing is set on a backend after this returns. It validates no
user options (the loader does) and knows nothing of plans or engines.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hybrid.checkpoint.reader import Checkpoint
from hybrid.experts.backend import ExpertBackend, Predict
from hybrid.experts.cache import ExpertCache
from hybrid.experts.cpu import CpuExperts
from hybrid.experts.hot import HotExperts
from hybrid.experts.mmap_tables import mmap_tables
from hybrid.experts.prefetch import Prefetcher
from hybrid.experts.ram_tables import ram_tables
from hybrid.experts.reference import ReferenceExperts
from hybrid.experts.routing_log import RoutingLog
from hybrid.experts.scheduler import Scheduler
from hybrid.experts.upload import UPLOAD_GROUP, PromptUpload, measured_rule

KINDS = ("numba", "reference")
OFFLOADS = ("on", "measured", "off")
MODES = ("mmap", "ram", "cache")


@dataclass(frozen=True)
class ExpertOptions:
    """What a backend is built with (already validated and resolved against the plan)."""

    kind: str = "numba"  # 'numba' (INT4 kernels on the CPU, the rest below) or 'reference' (the oracle: ignores the rest)
    device: str = "cpu"  # the GPU side's device: where hot experts and long-prompt uploads live
    expert_mode: str = "mmap"  # 'mmap' (tables over the shard maps), 'ram' (their copy) or 'cache' (RAM slots)
    cache_slots: int = 0  # cache mode: slots in the pool shared by all MoE layers
    io_threads: int = 2  # cache mode: read threads
    cache_policy: str = "lrfu"  # cache mode: eviction (hybrid.experts.policy)
    cpu_threads: int | None = None  # numba threads for the kernels (None: numba's default)
    prefetch: bool | str = False  # cache mode: True, False, or 'auto' (adaptive: on while its loads get used)
    prefetch_width: int = 0  # candidates per prediction (0 with prefetch: twice the experts per token)
    trace: Path | None = None  # write routing decisions as JSON lines here
    hot_experts: int = 0  # per MoE layer on the GPU side, chosen from the routing counts
    prefill_offload: str = "off"  # long prompts on the GPU side: 'on' (every multi-token call), 'measured', 'off'
    upload_group: int = UPLOAD_GROUP  # at most, experts per long-prompt upload (two groups live on the device)
    held: np.ndarray | None = field(default=None, compare=False)  # ram mode: bool [MoE layers, E] to copy (None: all)

    def __post_init__(self):
        if self.kind not in KINDS or self.prefill_offload not in OFFLOADS or self.expert_mode not in MODES:
            raise ValueError(f"ExpertOptions: kind {self.kind!r}, prefill_offload {self.prefill_offload!r} or "
                             f"expert_mode {self.expert_mode!r} is not one of {KINDS}, {OFFLOADS}, {MODES}")


def build_backend(ckpt: Checkpoint, opts: ExpertOptions, predict: Predict | None = None,
                  route_counts: Mapping[int, np.ndarray] | None = None) -> ExpertBackend:
    """The backend opts describe, complete. predict: the model's router (layer, x, width) -> ids, for
    prefetch; route_counts: counts an earlier session saved, which choose the hot experts now."""
    if opts.kind == "reference":
        return ReferenceExperts(ckpt)
    cfg = ckpt.config
    cache = None
    if opts.expert_mode == "cache":
        cache = ExpertCache(ckpt, opts.cache_slots, io_threads=opts.io_threads, policy=opts.cache_policy)
        cpu = CpuExperts(cache=cache, threads=opts.cpu_threads, on_caller=opts.device == "cpu")
    else:
        tables = ram_tables(ckpt, opts.held) if opts.expert_mode == "ram" else mmap_tables(ckpt)
        cpu = CpuExperts(tables=tables, threads=opts.cpu_threads, on_caller=opts.device == "cpu")
    trace = open(opts.trace, "w") if opts.trace else None  # noqa: SIM115 (closed by Scheduler.close)
    try:
        routing = RoutingLog(cfg.moe_layers, cfg.n_routed_experts, trace, route_counts)
        hot = HotExperts(ckpt, opts.hot_experts, opts.device, routing.counts)
        hot.refresh()  # the per-layer buffers, filled from the saved counts if any
        prefetcher = None
        if cache is not None and opts.prefetch:
            width = opts.prefetch_width or 2 * cfg.num_experts_per_tok
            prefetcher = Prefetcher(cache, dict(zip(cfg.moe_layers, cfg.moe_layers[1:])), width,
                                    adaptive=opts.prefetch == "auto")
        return Scheduler(cfg.moe_layers, cpu, hot, routing, prefetcher, _upload(ckpt, opts, cpu),
                         predict if prefetcher is not None else None)
    except BaseException:  # the worker, read threads and trace file must not outlive a failed build
        cpu.close()
        if cache is not None:
            cache.close()
        if trace is not None:
            trace.close()
        raise


def _upload(ckpt: Checkpoint, opts: ExpertOptions, cpu: CpuExperts) -> PromptUpload | None:
    if opts.prefill_offload == "off" or opts.upload_group < 1:
        return None
    if opts.prefill_offload == "on":
        rule = lambda n_tokens, n_experts: True  # noqa: E731 (for testing: every multi-token call)
    else:
        cfg = ckpt.config
        rule = measured_rule(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok,
                             cpu.tables[cfg.moe_layers[0]].expert_nbytes, torch.device(opts.device), cpu.prefill_rate)
    return PromptUpload(ckpt, cpu.tables, rule, opts.upload_group)
