"""CUDA-graph capture of a decode-step callable, with an eager fallback everywhere else.

Owns static input/output buffers, warm-up on a side stream, capture and replay, and host functions
in a stream's order (HostFuncs: how a graph hands data to the CPU and back). It does not decide what
goes into a step (hybrid.runtime.decode_step does); the callable is the same function either way.
Imports nothing from hybrid/.
"""
from __future__ import annotations

import ctypes
import logging
import time
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


_HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # CUhostFn: void (*)(void *userData)
POLL_S = 50e-6  # how long the waiting host thread sleeps between looks at a CUDA event


class HostFuncs:
    """Python callables run by the host in a CUDA stream's order: launch(key) enqueues callable `key`
    on the current stream (the driver's cuLaunchHostFunc), so it runs once all work before it there is
    done and holds back all work after it until it returns. Launched while a CUDA graph is captured,
    it becomes a host node of the graph, run at every replay: so a graph can hand data to the CPU and
    take its answer back, with no launch from Python in between.

    The callables run on a driver thread and must not call CUDA (no torch CUDA tensor ops, no
    synchronisation; numpy views of pinned buffers are fine). An exception in one is kept in
    `error` (the first one) for the launching thread to raise, never lost. While a stream holds host
    functions, wait for it with wait() (it sleeps, so the driver thread can take the GIL), not with a
    synchronize that may keep the GIL. Without CUDA, launch(key) calls the callable at once: the same
    order, which is how the CPU suite runs the code a GPU captures.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.fns: list[Callable[[], None]] = []
        self.error: BaseException | None = None
        self.running = False  # True while a host function runs (tests check what runs inside one)
        self.cancelled = False  # True: launched host functions return at once (an abandoned step drains)
        self._launch = None
        if cuda:
            try:
                lib = ctypes.CDLL("libcuda.so.1")  # the driver torch has loaded already
                self._launch = lib.cuLaunchHostFunc
            except (OSError, AttributeError) as e:
                raise RuntimeError(f"cuLaunchHostFunc is not available from the CUDA driver ({e}); "
                                   "host functions in CUDA graphs need CUDA 10 or newer") from e
            self._launch.argtypes = [ctypes.c_void_p, _HOST_FN, ctypes.c_void_p]
            self._launch.restype = ctypes.c_int
            self._callback = _HOST_FN(self._run)  # kept alive: the driver holds only its address

    def clear(self) -> None:
        """Forget every registered callable (only once no graph or stream that launches them can run)."""
        self.fns.clear()

    def add(self, fn: Callable[[], None]) -> int:
        """Register fn -> its key for launch()."""
        self.fns.append(fn)
        return len(self.fns) - 1

    def launch(self, key: int) -> None:
        if not self.cuda:
            self._call(key)
            return
        stream = torch.cuda.current_stream().cuda_stream
        rc = self._launch(ctypes.c_void_p(stream), self._callback, ctypes.c_void_p(key + 1))  # 0 would be NULL
        if rc != 0:
            raise RuntimeError(f"cuLaunchHostFunc failed with CUresult {rc}")

    def _run(self, user_data: int | None) -> None:
        self._call((user_data or 0) - 1)

    def _call(self, key: int) -> None:
        if self.cancelled:
            return
        self.running = True
        try:
            self.fns[key]()
        except BaseException as e:  # noqa: BLE001 (an exception must not unwind into the driver)
            if self.error is None:
                self.error = e
        finally:
            self.running = False

    def raise_error(self) -> None:
        """Raise (once) the first exception a host function raised since the last call."""
        e, self.error = self.error, None
        if e is not None:
            raise e

    @staticmethod
    def wait(event: Any) -> None:
        """Record `event` on the current stream and return once the stream reaches it, sleeping between
        polls (a blocking wait that held the GIL would stop the host functions it waits for)."""
        event.record()
        while not event.query():
            time.sleep(POLL_S)
