"""Long-prompt prefill offload: the CPU-or-GPU decision per MoE layer, and running a layer on the GPU side.

Owns the threshold arithmetic (from measured speeds, never a constant), the PCIe measurement, the
mechanics of moving one layer's experts to the device while the previous layer computes, and
PromptUpload, which streams a layer's used experts from the checkpoint and sums them there. It does
not choose which experts a token uses, and the decode path never comes here.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from kernels_cpu.table import PARTS, ExpertTable
from kernels_gpu.int4 import DeviceInt4, as_bf16, hot_expert_moe

from hybrid.checkpoint.reader import Checkpoint

ALIGN = 256  # byte alignment of each tensor inside an upload buffer (CUDA kernels like 256)
UPLOAD_GROUP = 16  # at most, experts per upload for a long prompt (K2: 0.4 GB; x2 pinned and x2 on the GPU)
Offload = Callable[[int, int], bool]  # (prompt tokens, experts touched) -> run this layer on the GPU side?


@dataclass(frozen=True)
class PrefillSpeeds:
    """Measured speeds the decision needs (per MoE layer, one process, the machine as it runs)."""

    pcie_gbps: float  # host -> device copy from pinned memory, GB/s (10^9 bytes)
    cpu_tokens_per_s: float  # tokens one MoE layer's routed experts process per second on the CPU, at prefill
    gpu_flops: float  # FLOP/s of the GPU's dequantising INT4 matmul at prefill batch sizes


def expert_flops_per_token(hidden: int, inter: int, top_k: int) -> float:
    """Routed-expert FLOPs one token costs in one layer: K experts x 3 projections x 2*D*F."""
    return 2.0 * 3 * hidden * inter * top_k


def offload_threshold(speeds: PrefillSpeeds, experts_touched: int, bytes_per_expert: int,
                      flops_per_token: float) -> float:
    """Prompt tokens above which uploading a layer's touched experts beats computing them on the CPU.

    With N prompt tokens, E_t touched experts of B bytes each, PCIe bandwidth p (bytes/s), CPU
    throughput c (tokens/s per layer) and GPU compute rate g = gpu_flops / flops_per_token (tokens/s):
        t_cpu(N) = N / c
        t_gpu(N) = max(E_t * B / p, N / g)    (double-buffered: upload overlaps compute)
    The GPU wins when t_gpu < t_cpu, i.e. when g > c and N > N* with
        N* = c * E_t * B / p.
    Returns N* (tokens), or inf when the GPU computes no faster than the CPU (g <= c).
    K2 example: c = 1,000 tok/s, E_t = 384, B = 24.8 MB, p = 25 GB/s -> N* = 381 tokens.
    """
    g = speeds.gpu_flops / flops_per_token
    if g <= speeds.cpu_tokens_per_s or speeds.pcie_gbps <= 0:
        return math.inf
    return speeds.cpu_tokens_per_s * experts_touched * bytes_per_expert / (speeds.pcie_gbps * 1e9)


def prefill_on_gpu(n_tokens: int, speeds: PrefillSpeeds, experts_touched: int, bytes_per_expert: int,
                   flops_per_token: float) -> bool:
    """True: upload this layer's touched experts (LayerUploader) and run its MoE on the GPU;
    False: compute it on the CPU. The rule is offload_threshold's formula, strictly above N*."""
    return n_tokens > offload_threshold(speeds, experts_touched, bytes_per_expert, flops_per_token)


def measure_pcie_gbps(nbytes: int = 256 << 20, repeats: int = 5, device: int | None = None) -> float | None:
    """Host (pinned) -> device copy bandwidth in GB/s, best of `repeats`; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    dev = torch.device("cuda", torch.cuda.current_device() if device is None else device)
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst.copy_(src, non_blocking=True)  # warm-up: first-touch and context costs
    torch.cuda.synchronize(dev)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def measured_rule(hidden: int, inter: int, top_k: int, expert_bytes: int, device: torch.device,
                  cpu_rate: Callable[[], float]) -> Offload:
    """prefill_on_gpu from speeds measured on this machine (CUDA only): PCIe and the GPU's matmul rate
    at the first decision, the CPU experts' prefill rate (cpu_rate(), tokens/s) as prefills run."""
    flops_tok = expert_flops_per_token(hidden, inter, top_k)
    speeds: dict = {}

    def decide(n_tokens: int, n_experts: int) -> bool:
        if not speeds:
            a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(4):
                a @ a
            torch.cuda.synchronize()
            # dequantising INT4 runs well below the dense rate: count half of it
            speeds.update(pcie=measure_pcie_gbps() or 0.0, gpu=0.5 * 4 * 2 * 4096**3 / (time.perf_counter() - t0))
        cpu_tps = cpu_rate()
        if cpu_tps == 0.0:
            return False  # measure the CPU on this prefill first
        return prefill_on_gpu(n_tokens, PrefillSpeeds(speeds["pcie"], cpu_tps, speeds["gpu"]), n_experts,
                              expert_bytes, flops_tok)

    return decide


# ---- double-buffered upload ---------------------------------------------------------------------

Payload = Sequence[torch.Tensor | np.ndarray]  # one item: the arrays of a group of experts (or a layer)


def _copy_bytes(dst: torch.Tensor, a: torch.Tensor | np.ndarray) -> None:
    """Copy a CPU array's bytes into the flat uint8 CPU tensor `dst` (checkpoint memmaps are read-only,
    so numpy arrays are copied by numpy rather than wrapped by torch)."""
    if isinstance(a, np.ndarray):
        dst.numpy()[:] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    else:
        dst.copy_(a.detach().contiguous().reshape(-1).view(torch.uint8))


def _torch_dtype(a: torch.Tensor | np.ndarray) -> torch.dtype:
    return a.dtype if isinstance(a, torch.Tensor) else torch.from_numpy(np.empty(0, a.dtype)).dtype


class LayerUploader:
    """Moves a sequence of payloads (arrays of a group of experts each) to `device`, two at a time.

    stream(payloads) yields, per payload, device tensors equal to its arrays (same dtypes, shapes).
    While the caller computes on item i, item i+1 is already copied to the host staging buffer and
    its host -> device copy runs on a side stream, so the caller's (asynchronous) compute on item i
    overlaps the copy of item i+1. A yielded list stays valid until the caller asks for the next
    item; then its buffers take item i+2 (on CUDA only after the compute queued on them is done).
    On CUDA: two pinned host buffers, two device buffers, one copy stream, events in both
    directions (the copy into a slot waits for the compute that last used it). Elsewhere the
    copies are synchronous and the same code path runs.
    capacity: bytes of the largest payload; the uploader holds 2x that pinned and 2x on the device.
    A whole K2 layer is 9.5 GB, so stream a layer as groups of experts (32 experts = 0.8 GB): the
    routed sum splits over groups exactly (int4.hot_expert_moe per group, y summed).
    """

    def __init__(self, capacity: int, device: torch.device | str):
        self.device = torch.device(device)
        self.capacity = int(capacity)
        cuda = self.device.type == "cuda"
        self.host = [torch.empty(self.capacity, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self.dev = [torch.empty(self.capacity, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self.stream_ = torch.cuda.Stream(self.device) if cuda else None
        self.copied: list = [None, None]  # per slot: event after its host -> device copy
        self.used: list = [None, None]  # per slot: event after the caller's compute on it

    def _layout(self, payload: Payload) -> list[tuple[int, int]]:
        spans, pos = [], 0
        for a in payload:
            n = a.numel() * a.element_size() if isinstance(a, torch.Tensor) else a.nbytes
            spans.append((pos, n))
            pos = -(-(pos + n) // ALIGN) * ALIGN
        if spans and spans[-1][0] + spans[-1][1] > self.capacity:
            raise ValueError(f"LayerUploader: a payload needs {spans[-1][0] + spans[-1][1]:,} bytes, "
                             f"capacity is {self.capacity:,}")
        return spans

    def _stage(self, slot: int, payload: Payload) -> list[torch.Tensor]:
        """Fill host[slot], start its copy to dev[slot]; return the device views."""
        spans = self._layout(payload)
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # the previous copy out of this host buffer is done
        for (off, n), a in zip(spans, payload):
            _copy_bytes(self.host[slot][off:off + n], a)
        end = spans[-1][0] + spans[-1][1] if spans else 0
        if self.stream_ is None:
            self.dev[slot][:end].copy_(self.host[slot][:end])
        else:
            with torch.cuda.stream(self.stream_):
                if self.used[slot] is not None:
                    self.stream_.wait_event(self.used[slot])  # the caller is done with this slot
                self.dev[slot][:end].copy_(self.host[slot][:end], non_blocking=True)
                self.copied[slot] = torch.cuda.Event()
                self.copied[slot].record(self.stream_)
        return [self.dev[slot][off:off + n].view(_torch_dtype(a)).view(tuple(a.shape))
                for (off, n), a in zip(spans, payload)]

    def stream(self, payloads: Iterable[Payload]) -> Iterator[list[torch.Tensor]]:
        it = iter(payloads)
        first = next(it, None)
        if first is None:
            return
        views, slot = self._stage(0, first), 0
        for nxt in it:
            upcoming = self._stage(1 - slot, nxt)  # in flight while the caller computes on `views`
            yield self._ready(slot, views)
            self._done(slot)
            views, slot = upcoming, 1 - slot
        yield self._ready(slot, views)
        self._done(slot)

    def _ready(self, slot: int, views: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.stream_ is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        return views

    def _done(self, slot: int) -> None:
        if self.stream_ is not None:
            self.used[slot] = torch.cuda.Event()
            self.used[slot].record(torch.cuda.current_stream(self.device))


class PromptUpload:
    """A long prompt's MoE layer computed on the GPU side: its used experts streamed up from the
    checkpoint in double-buffered groups of at most `group`, the routed sum run there (exact: the sum
    splits over groups). rule decides per layer call, for multi-token calls only."""

    def __init__(self, ckpt: Checkpoint, tables: dict[int, ExpertTable], rule: Offload, group: int = UPLOAD_GROUP):
        if group < 1:
            raise ValueError(f"PromptUpload needs a group of at least one expert, got {group}")
        self.ckpt, self.tables, self.rule, self.group = ckpt, tables, rule, group
        self._uploader: LayerUploader | None = None  # made at the first upload, on the input's device
        self.uploaded_layers = 0

    def wants(self, n_tokens: int, n_experts: int) -> bool:
        """Whether a call of n_tokens tokens touching n_experts experts runs on the GPU side."""
        return n_tokens > 1 and self.rule(n_tokens, n_experts)

    def compute(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                used: list[int]) -> torch.Tensor:
        """x [T, D], ids [T, K], weights [T, K] (zero on pairs computed elsewhere); used: the experts
        with a non-zero weight -> y fp32 [T, D] on x's device."""
        table, n = self.tables[layer], self.group
        if self._uploader is None:
            self._uploader = LayerUploader(n * int(table.expert_nbytes) + 64 * 6 * n, x.device)
        D, I = table.hidden, table.inter
        shapes = ((I, D), (I, D), (D, I))
        groups = [used[i:i + n] for i in range(0, len(used), n)]
        payloads = ([a for e in g for a in self._fetch(layer, e)] for g in groups)
        y = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        for g, arrays in zip(groups, self._uploader.stream(payloads)):
            hot = {e: tuple(DeviceInt4(arrays[6 * k + 2 * j], as_bf16(arrays[6 * k + 2 * j + 1]), *shapes[j])
                            for j in range(3)) for k, e in enumerate(g)}
            y += hot_expert_moe(x, ids, weights, hot)[0]
        self.uploaded_layers += 1
        return y

    def _fetch(self, layer: int, e: int) -> list[np.ndarray]:
        """An expert's 6 arrays in PARTS order, in the on-disk layout."""
        return [self.ckpt.array(f"model.layers.{layer}.mlp.experts.{e}.{part}") for part in PARTS]
