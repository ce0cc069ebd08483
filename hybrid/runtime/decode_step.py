"""The decode step with fixed shapes: one CUDA graph per token, the CPU expert hops inside it.

Owns running one token: the hop's host functions, KV-length buckets, capture, failure handling and
timing. What each segment computes is decode_segments.py (the model's own functions), the buffers
they share decode_buffers.py; none of the three adds math. Without CUDA the same code runs eagerly.
"""
from __future__ import annotations

import gc
import logging
import time
from typing import Any, Callable

import torch

from hybrid.experts.hot import HotSlots, fused_kernel
from hybrid.model.k2 import Cache, Model
from hybrid.runtime.decode_buffers import StepBuffers
from hybrid.runtime.decode_segments import HostHops, Segment, build_segments
from hybrid.runtime.graphs import GraphChain, HostFuncs

log = logging.getLogger(__name__)
BUCKET_MIN = 256  # smallest KV span a decode graph reads; the waste is at most 2x of attention's reads
MODES = ("auto", "token", "segments")


class StaticDecoder:
    """decoder = StaticDecoder(model, cache); logits = decoder.step(token) for one token at cache.length
    (generate() takes decoder.step as its decode_step).

    One token, per MoE layer i (the first segment also embeds and runs any dense layers before i):
      pre[i]     add the previous MoE layer's output, attention i, norm, router i; copy x, ids and
                 weights (and, with prefetch, the next layer's candidate experts) into pinned buffers
      submit[i]  host: hand them to the expert scheduler, which computes the cold pairs on the CPU
      gpu[i]     the shared expert and the hot experts (HotSlots) of layer i, while the CPU works
      wait[i]    host: the CPU's share into a pinned buffer, which the next segment copies back
      head       the last MoE layer's output, any dense layers after it, final norm, lm_head.
    Mode 'token': submit and wait are CUDA host functions (hybrid.runtime.graphs.HostFuncs), so the
    whole token is one graph, one launch from Python. Mode 'segments': pre and shared+head are
    graphs of their own and the host hops between them (two launches per MoE layer); it needs no
    host functions and takes any expert backend and hot experts kept in plain dicts.
    Segments pass tensors on through buffers allocated once (decode_buffers.StepBuffers) and written
    with copy_, never through rebound names, so a replay moves data exactly as the eager run the CPU
    tests check. The KV cache is read through a fixed span (the bucket: a power of two >= the length,
    at least BUCKET_MIN), masked beyond the position, which lives in a device tensor; each bucket is
    captured once.

    graphs: capture CUDA graphs (None: when the model is on CUDA; True without CUDA runs eagerly).
    mode: 'token' (one graph per token, the expert hops as host functions), 'segments' (a graph per
    segment, the host hopping between them) or 'auto' (token where it can run, see token_blocker()).
    Not for defer_experts > 0 (the deferred sum crosses layers outside these segments).
    """

    def __init__(self, model: Model, cache: Cache, graphs: bool | None = None, bucket_min: int = BUCKET_MIN,
                 mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"decode step mode must be one of {', '.join(MODES)}, got {mode!r}")
        if model.defer_experts:
            raise ValueError("the static decode step does not support defer_experts; set defer_experts=0 "
                             "or turn decode graphs off")
        self.model, self.cache, self.bucket_min = model, cache, bucket_min
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        self.graphs = self.cuda if graphs is None else bool(graphs and self.cuda)
        self.mode = "segments"
        ex = model.experts
        self.predicting = ex.prefetch_width > 0  # the next MoE layer's candidates, for the backend's prefetch
        # outside any graph pool; the host's copies pinned (in-graph copies to or from the host need pinned pages)
        self.bufs = StepBuffers.allocate(model, self.cuda, ex.prefetch_width or model.cfg.num_experts_per_tok)
        self._routed_dev_used = False  # segment mode: bufs.routed holds a layer's device share
        self._segs: dict[int, list[Segment]] = {}  # span -> its segments
        self.chains: dict[int, GraphChain] = {}  # span -> its captured graphs
        # span -> what runs each segment: the segments themselves, then their graphs' replays once captured
        # (token mode: one entry, the whole token)
        self._calls: dict[int, list[Callable[[], None]]] = {}
        self._hot_seen: tuple = ()  # token mode: the scheduler's hot-set objects the segments were built over
        # one memory pool for every bucket's graphs: they run one at a time and pass data only through
        # self.bufs, so any may reuse another's temporaries (K2's dequantised lm_head alone is 2.3 GB)
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        # a spinning (non-blocking) event: while the host waits on it, the CPU workers have nothing to do yet
        self.event = torch.cuda.Event() if self.cuda else None
        self.host: HostFuncs | None = None
        self._handles: dict[int, Any] = {}  # token mode: layer -> the scheduler's handle, from submit to wait
        self._mark = 0.0  # token mode: when the host last finished something (for the per-stretch times)
        self.steps = 0
        if mode != "segments":
            blocker = self.token_blocker()
            if blocker is None:
                self.mode = "token"
                self.host = HostFuncs(self.cuda)
            elif mode == "token":
                raise ValueError(f"the one-graph-per-token decode step cannot run here: {blocker}")
            else:
                log.info("decode step: a graph per segment, not per token: %s", blocker)

    def token_blocker(self) -> str | None:
        """Why mode 'token' cannot run on this model (None: it can)."""
        ex = self.model.experts
        if not ex.host_hops:
            return "the expert backend has no host entry points a CUDA host function may call (host_hops is False)"
        hot_sets = ex.hot.values()
        if any(hot and not isinstance(hot, HotSlots) for hot in hot_sets):
            return "hot experts are kept in plain dicts, not HotSlots (the step computes them from its slots)"
        if self.cuda:
            if any(isinstance(hot, HotSlots) for hot in hot_sets) and fused_kernel(ex.fused_hot, True) is None:
                return "hot experts need Triton for the fused kernel (pip install triton)"
            try:
                HostFuncs(True)
            except RuntimeError as e:
                return str(e)
        return None

    # ---- public ---------------------------------------------------------------------------------
    def bucket(self, length: int) -> int:
        """The KV span a step at total length `length` attends over."""
        span = max(self.bucket_min, 1 << max(0, length - 1).bit_length())
        return min(span, self.cache.max_len)

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Decode `token` at position cache.length -> fp32 logits [1, vocab] (a fresh tensor)."""
        if not self.cuda:
            return self._step(token)
        with torch.cuda.device(self.device):  # streams, events and capture on the model's GPU
            return self._step(token)

    def _step(self, token: int) -> torch.Tensor:
        cache, pos = self.cache, self.cache.length
        cache.prepare(pos, pos + 1)  # the page it writes allocated (or the bound checked) before any launch
        if cache.spilled():  # a replayed graph would read the compute device's pool in their place
            raise RuntimeError("the static decode step reads the compute device's KV pages only; decode with "
                               "model.forward while some are in the host tier (Engine does)")
        if self.model.defer_experts:
            raise ValueError("the static decode step does not support defer_experts; set it back to 0")
        if not 0 <= token < self.model.cfg.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary of {self.model.cfg.vocab_size}")
        if self.mode == "token":
            self._check_hot_sets()
        span = self.bucket(pos + 1)
        b = self.bufs
        b.tp_h[0], b.tp_h[1] = token, pos
        # Model.embed's row, indexed here on the host: the table may live in host RAM
        b.emb_h.copy_(self.model.weights.embed_tokens[token:token + 1])
        t_start = time.perf_counter()
        if span not in self._segs:
            self._segs[span] = self._segments(span)
            if self.mode == "token":
                self._calls[span] = [self._token_fn(self._segs[span])]
            else:
                self._calls[span] = [run for _, _, run in self._segs[span]]
        segments = self._segs[span]
        # no garbage collection while host functions may run: one inside a host function could free a
        # CUDA tensor there, and the allocator would call CUDA from the driver's thread
        gc_paused = self.mode == "token" and self.cuda and gc.isenabled()
        if gc_paused:
            gc.disable()
        try:
            logits = self._launch(span, segments, t_start)
        except BaseException:
            self._abandon()
            raise
        finally:
            if gc_paused:
                gc.enable()
            # also for a failed step: its parts were counted, and they must stay within the whole
            self.model.times.forward += time.perf_counter() - t_start
        cache.length = pos + 1
        self.steps += 1
        return logits

    def _launch(self, span: int, segments: list[Segment], t_start: float) -> torch.Tensor:
        """Run the step for `span` (capturing its graphs first if due) and wait for it -> logits."""
        if span not in self.chains and self.graphs:
            side = torch.cuda.Stream()  # warm-up off the default stream, as capture wants
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):
                    self._run(segments, self._calls[span], t_start)  # the real step, eagerly: this token's result
            finally:  # also on failure: waiting on this stream then waits for what the side stream queued
                torch.cuda.current_stream().wait_stream(side)
            logits = self.bufs.logits.clone()
            self._finish()
            try:  # the outer stream context restores this stream even when a failed capture cannot
                with torch.cuda.stream(torch.cuda.current_stream()):
                    chain = GraphChain(self._calls[span], self.pool)  # not captured yet: the eager callables
                self.chains[span] = chain
                self._calls[span] = [g.replay for g in chain.graphs]
            except Exception:  # keep decoding, eagerly, rather than fail every step from here on
                log.exception("capturing the decode step as CUDA graphs failed; decoding without them")
                self.graphs = False
        else:
            self._run(segments, self._calls[span], t_start)
            logits = self.bufs.logits.clone()
            self._finish()
        return logits

    def reset(self) -> None:
        """Drop every bucket's segments and graphs (and what they hold, like HotSlots being replaced);
        the next step builds and captures again."""
        self._segs.clear()
        self._calls.clear()
        self.chains.clear()
        self._hot_seen = ()
        if self.host is not None:
            self.host.clear()
        self.bufs.routed.zero_()  # token mode writes it for HotSlots layers; segment mode adds it everywhere
        self._routed_dev_used = False

    def _abandon(self) -> None:
        """A step failed or was interrupted after its host functions may have been queued: let the
        queued ones return at once, wait (through further interrupts) until the device is past them,
        and drop what they left, so the next step starts clean and nothing runs under it."""
        if self.mode != "token" or self.host is None:
            return
        self.host.cancelled = True
        try:
            while self.cuda:
                try:
                    HostFuncs.wait(self.event)
                    break
                except KeyboardInterrupt:
                    continue
        finally:
            self.host.cancelled = False
            self.host.error = None
            self._handles.clear()

    # ---- the host loop ------------------------------------------------------------------------
    def _run(self, segments: list[Segment], calls: list[Callable[[], None]], t_start: float) -> None:
        """calls[k] runs segment k: the segment itself (eagerly) or its captured graph's replay;
        token mode: calls[0] runs the whole token (the host functions inside it do the hops)."""
        if self.mode == "token":
            self._mark = t_start
            calls[0]()
            return
        times = self.model.times
        for (kind, layer, _), go in zip(segments, calls):
            t0 = time.perf_counter()
            if kind == "pre":
                go()
                if self.event is not None:
                    self.event.record()
                times.attention += time.perf_counter() - t0
            elif kind == "shared":
                if self.cuda:  # on the GPU's queue before the host blocks: overlaps the CPU experts
                    go()
                    self.event.synchronize()  # x, ids and weights are in the pinned buffers
                    t1 = time.perf_counter()
                    times.attention += t1 - t0  # the rest of pre[i], as the host waited for it
                    self._hop(layer, None)
                else:  # one CPU does both: submit first, so the shared expert overlaps the workers
                    self._hop(layer, go)
            else:
                go()
                if self.cuda:
                    torch.cuda.current_stream().synchronize()
                times.lm_head += time.perf_counter() - t0

    def _finish(self) -> None:
        """Token mode: wait for the token (sleeping, so the host functions can run) and count the head's
        time; raise what a host function raised."""
        if self.mode != "token":
            return
        if self.cuda:
            HostFuncs.wait(self.event)
        self.model.times.lm_head += time.perf_counter() - self._mark
        self._handles.clear()
        self.host.raise_error()

    def _hop(self, layer: int, shared: Callable[[], None] | None) -> None:
        """Segment mode: the routed experts of `layer`: submit from the pinned buffers, collect into
        bufs.routed_h / bufs.routed."""
        ex, times, b = self.model.experts, self.model.times, self.bufs
        t0 = time.perf_counter()
        # x, ids, w are layer's until the next pre segment runs; a backend with host hops reads the host copies
        handle = ex.submit_host(layer, b.x, b.ids, b.w, b.x_np, b.ids_np, b.w_np)
        t1 = time.perf_counter()
        if shared is not None:
            shared()
        t2 = time.perf_counter()
        y_dev = ex.wait_host(handle, b.routed_np)
        if y_dev is not None:
            b.routed.copy_(y_dev)
            self._routed_dev_used = True
        elif self._routed_dev_used:
            b.routed.zero_()
            self._routed_dev_used = False
        times.submit += t1 - t0
        times.shared += t2 - t1
        times.experts_wait += time.perf_counter() - t2

    # ---- token mode: the host functions ---------------------------------------------------------
    def _token_fn(self, segments: list[Segment]) -> Callable[[], None]:
        """The whole token as one callable: device segments run, host segments are launched as host
        functions (called at once without CUDA). What a graph captures."""
        host = self.host
        # host segments become launches of their registered keys; device segments run as they are
        steps = [(lambda key=host.add(run): host.launch(key)) if kind in ("submit", "wait") else run
                 for kind, _, run in segments]

        def token() -> None:
            for run in steps:
                run()
        return token

    def _submit(self, layer: int) -> Callable[[], None]:
        ex, times, b = self.model.experts, self.model.times, self.bufs
        predicting = self.predicting and layer in ex.next_layer

        def run() -> None:  # a CUDA host function: no device work in here
            t0 = time.perf_counter()
            times.attention += t0 - self._mark  # pre[i] on the device, as the host saw it
            try:
                self._handles[layer] = ex.submit_host(layer, b.x, b.ids, b.w, b.x_np, b.ids_np, b.w_np, device_hot=True,
                                                      predicted=b.cand_np if predicting else None)
            finally:
                self._mark = time.perf_counter()
                times.submit += self._mark - t0
        return run

    def _wait(self, layer: int) -> Callable[[], None]:
        ex, times, out = self.model.experts, self.model.times, self.bufs.routed_np

        def run() -> None:  # a CUDA host function
            t0 = time.perf_counter()
            times.shared += t0 - self._mark  # the shared and hot experts on the device
            handle = self._handles.pop(layer, None)
            try:
                if handle is None:  # its submit failed (the step raises that): add nothing
                    out.fill(0.0)
                elif ex.wait_host(handle, out) is not None:
                    raise RuntimeError(f"layer {layer}: the expert backend computed hot experts inside the hop; "
                                       "the one-graph-per-token step computes them itself from HotSlots")
            except BaseException:
                out.fill(0.0)
                raise
            finally:
                self._mark = time.perf_counter()
                times.experts_wait += self._mark - t0
        return run

    def _check_hot_sets(self) -> None:
        """Token mode reads each layer's HotSlots from inside the graph: if the scheduler now holds
        other objects (set_hot), build and capture again; plain dicts need segment mode."""
        hot = self.model.experts.hot
        # the objects themselves (an id could be reused), and whether a plain dict has experts in it
        seen = tuple((layer, h, not isinstance(h, HotSlots) and bool(h)) for layer, h in sorted(hot.items()))
        if len(seen) == len(self._hot_seen) and all(a[0] == b[0] and a[1] is b[1] and a[2] == b[2]
                                                    for a, b in zip(seen, self._hot_seen)):
            return
        if self._hot_seen:
            log.info("decode step: the hot-expert sets changed; building the step again")
        self.reset()
        self._hot_seen = seen
        blocker = self.token_blocker()
        if blocker is not None:
            log.info("decode step: a graph per segment from here on: %s", blocker)
            self.mode = "segments"

    def _segments(self, span: int) -> list[Segment]:
        hops = HostHops(self._submit, self._wait) if self.mode == "token" else None
        return build_segments(self.model, self.cache, self.bufs, span, hops)
