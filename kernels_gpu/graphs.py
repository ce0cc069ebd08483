"""CUDA-graph capture of a decode-step callable, with an eager fallback everywhere else.

Owns static input/output buffers, warm-up on a side stream, capture and replay. It does not decide
what goes into a step (the engine does) and adds no per-device branches to the math: the callable is
the same function either way. Imports nothing from hybrid/.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


class GraphedStep:
    """step = GraphedStep(fn, *example_inputs); out = step(*inputs).

    fn takes tensors only (anything else belongs in a closure) and returns a tensor or a tuple/list of
    tensors. On CUDA (all example inputs on one CUDA device, enabled not False) fn is warmed up
    `warmup` times on a side stream, captured once into a CUDA graph, and every call copies the
    inputs into the static input buffers and replays: shapes and dtypes must equal the examples.
    The returned tensors are the graph's static outputs, overwritten by the next call: clone what
    must outlive it. fn must be capturable: no host syncs (.item(), .cpu(), nonzero), no allocation
    that depends on values, no CPU tensors. Elsewhere (CPU, or enabled=False) a call is fn(*inputs).
    """

    def __init__(self, fn: Callable[..., Any], *example_inputs: torch.Tensor, enabled: bool | None = None,
                 warmup: int = 3, pool: Any = None):
        self.fn = fn
        devices = {t.device for t in example_inputs}
        cuda = len(devices) == 1 and next(iter(devices)).type == "cuda"
        self.graphed = cuda if enabled is None else bool(enabled and cuda)
        if enabled and not cuda:
            log.info("CUDA graph not captured: inputs are on %s; running eagerly", sorted(map(str, devices)))
        self.graph = None
        if self.graphed:
            self._capture(example_inputs, warmup, pool)

    def _capture(self, example_inputs: tuple[torch.Tensor, ...], warmup: int, pool: Any) -> None:
        self.static_in = [t.clone() for t in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream: cuBLAS handles, allocator pools
            for _ in range(warmup):
                self.fn(*self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.static_out = self.fn(*self.static_in)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if not self.graphed:
            return self.fn(*inputs)
        if len(inputs) != len(self.static_in):
            raise ValueError(f"GraphedStep: captured with {len(self.static_in)} inputs, called with {len(inputs)}")
        for buf, t in zip(self.static_in, inputs):
            if buf.shape != t.shape or buf.dtype != t.dtype:
                raise ValueError(f"GraphedStep: input {tuple(t.shape)} {t.dtype} differs from the captured "
                                 f"{tuple(buf.shape)} {buf.dtype}; capture one step per shape (bucket)")
            if buf.data_ptr() != t.data_ptr():
                buf.copy_(t, non_blocking=True)
        self.graph.replay()
        return self.static_out


class GraphCache:
    """One GraphedStep per key (e.g. a KV-length bucket), captured on first use with that call's inputs.
    Each graph keeps its own memory pool (sharing one is only safe for a fixed replay order)."""

    def __init__(self, fn: Callable[..., Any], enabled: bool | None = None, warmup: int = 3):
        self.fn, self.enabled, self.warmup = fn, enabled, warmup
        self.steps: dict[Any, GraphedStep] = {}

    def __call__(self, key: Any, *inputs: torch.Tensor) -> Any:
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = GraphedStep(self.fn, *inputs, enabled=self.enabled, warmup=self.warmup)
        return step(*inputs)


class GraphChain:
    """Zero-argument callables captured in order into CUDA graphs that share one memory pool, then
    replayed one at a time, always in that same order (the rule that makes one shared pool safe: a
    later graph may reuse memory an earlier one freed, never memory a later one still reads).

    The callables pass tensors to each other through state they close over (a dict, pinned host
    buffers, the KV cache): during capture each reads the tensors the previous captures left there,
    so a replay reads them at the same addresses. Warm each callable up (run it once, eagerly, with
    real inputs) before capturing: capture records kernels without running them, and first calls
    choose kernels, create cuBLAS handles and learn which ops work. CUDA only.
    """

    def __init__(self, fns: list[Callable[[], Any]], pool: Any = None):
        """pool: a torch.cuda.graph_pool_handle() to share with other chains (safe when their graphs
        never run at the same time and pass nothing through pool memory); None: a pool of its own."""
        self.pool = torch.cuda.graph_pool_handle() if pool is None else pool
        self.graphs: list[torch.cuda.CUDAGraph] = []
        for fn in fns:
            g = torch.cuda.CUDAGraph()
            # thread_local: the expert workers and IO threads may touch CUDA while this thread captures
            with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
                fn()
            self.graphs.append(g)

    def __len__(self) -> int:
        return len(self.graphs)

    def replay(self, k: int) -> None:
        self.graphs[k].replay()
