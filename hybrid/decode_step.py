"""The decode step with fixed shapes, run as segments between the CPU expert hops; on CUDA, graphs.

Owns cutting one decode token into segments at the MoE layers, the buffers the segments share
(pinned host buffers for the hop to the CPU experts and back), KV-length buckets, and capturing a
bucket's segments as CUDA graphs the first time it is used. The math is the model's own
(Model.embed rows, attention, route, ffn, shared_expert, head; rms_norm); this file adds none. Without CUDA the same segments
run eagerly, so the CPU suite tests exactly the code a GPU captures.

One token, per MoE layer i (the first segment also embeds and runs any dense layers before i):
  pre[i]     add the previous MoE layer's output, attention i, norm, router i; copy x, ids and
             weights into pinned host buffers (inside the graph)
  shared[i]  the shared expert of layer i: enqueued before the host waits, so it runs on the GPU
             while the CPU computes the routed experts
  hop        the host waits for pre[i] (an event), submits x, ids, weights to the expert backend
             from the pinned buffers, and writes the CPU's share of the routed sum into a pinned
             buffer that the next segment copies to the device (inside its graph)
  head       the last MoE layer's output, any dense layers after it, final norm, lm_head.
Segments pass tensors on through device buffers allocated once (each writes its results into them
with copy_), never through rebound names: a replayed graph then moves data exactly as the eager run
the CPU tests check, and all buckets share them.
So the GPU runs two graph launches per MoE layer, not one launch per kernel. The KV cache is read
through a fixed span (the bucket: a power of two >= the length, at least BUCKET_MIN), masked beyond
the position, which lives in a device tensor; each bucket is captured once.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from .model import KVCache, Model, rms_norm

log = logging.getLogger(__name__)
BUCKET_MIN = 256  # smallest KV span a decode graph reads; the waste is at most 2x of attention's reads

Segment = tuple[str, int, Callable[[], None]]  # (kind 'pre' / 'shared' / 'head', layer, run)


class StaticDecoder:
    """decoder = StaticDecoder(model, cache); logits = decoder.step(token) for one token at cache.length
    (generate() takes decoder.step as its decode_step).

    graphs: capture CUDA graphs (None: when the model is on CUDA; True without CUDA runs eagerly).
    Not for defer_experts > 0 (the deferred sum crosses layers outside these segments).
    """

    def __init__(self, model: Model, cache: KVCache, graphs: bool | None = None, bucket_min: int = BUCKET_MIN):
        if model.defer_experts:
            raise ValueError("the static decode step does not support defer_experts; set defer_experts=0 "
                             "or turn decode graphs off")
        self.model, self.cache, self.bucket_min = model, cache, bucket_min
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        self.graphs = self.cuda if graphs is None else bool(graphs and self.cuda)
        cfg = model.cfg
        D, K = cfg.hidden_size, cfg.num_experts_per_tok

        def host(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            t = torch.zeros(shape, dtype=dtype)
            return t.pin_memory() if self.cuda else t  # in-graph copies to or from the host need pinned pages

        self.tp_h = host((2,), torch.long)  # this step's token id and position
        self.emb_h = host((1, D), model.dtype)  # its embedding row (the table may live in host RAM)
        self.x_h, self.ids_h, self.w_h = host((1, D), torch.float32), host((1, K), torch.long), host((1, K), torch.float32)
        self.routed_h = host((1, D), torch.float32)  # the CPU's share of the routed sum
        # numpy views of the pinned buffers, made once: what the CPU expert kernels read and write
        self._host_np = (self.x_h.numpy(), self.ids_h.numpy(), self.w_h.numpy(), self.routed_h.numpy())
        self.routed_dev = torch.zeros(1, D, device=self.device, dtype=torch.float32)  # the GPU side's share
        self._routed_dev_used = False
        # What the segments pass on lives in these device buffers, allocated once, outside any graph
        # pool: a segment reads them and writes its results into them with copy_, never rebinding a
        # name. So a replayed graph and an eager run move data the same way, every bucket's graphs
        # share them, and the host reads a layer's x / ids / w before the next segment overwrites them.
        dt, R, V = model.w["model.norm.weight"].dtype, cfg.qk_rope_head_dim, cfg.vocab_size
        dev, f32 = self.device, torch.float32
        self.buf = {"s0": torch.zeros((), device=dev, dtype=torch.long),
                    "cos": torch.zeros(1, R // 2, device=dev, dtype=f32), "sin": torch.zeros(1, R // 2, device=dev, dtype=f32),
                    "h": torch.zeros(1, D, device=dev, dtype=dt), "x": torch.zeros(1, D, device=dev, dtype=dt),
                    "ids": torch.zeros(1, K, device=dev, dtype=torch.long), "w": torch.zeros(1, K, device=dev, dtype=f32),
                    "shared": torch.zeros(1, D, device=dev, dtype=dt), "logits": torch.zeros(1, V, device=dev, dtype=f32)}
        self._segs: dict[int, list[Segment]] = {}  # span -> its segments
        self.chains: dict[int, Any] = {}  # span -> kernels_gpu.graphs.GraphChain
        # span -> what runs each segment: the segments themselves, then their graphs' replays once captured
        self._calls: dict[int, list[Callable[[], None]]] = {}
        # one memory pool for every bucket's graphs: they run one at a time and pass data only through
        # self.buf, so any may reuse another's temporaries (K2's dequantised lm_head alone is 2.3 GB)
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        # a spinning (non-blocking) event: while the host waits on it, the CPU workers have nothing to do yet
        self.event = torch.cuda.Event() if self.cuda else None
        self.steps = 0

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
        if pos + 1 > cache.max_len:
            raise ValueError(f"{pos + 1} positions exceed the KV cache of {cache.max_len}; raise the context size")
        if self.model.defer_experts:
            raise ValueError("the static decode step does not support defer_experts; set it back to 0")
        if not 0 <= token < self.model.cfg.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary of {self.model.cfg.vocab_size}")
        span = self.bucket(pos + 1)
        self.tp_h[0], self.tp_h[1] = token, pos
        self.emb_h.copy_(self.model.w["model.embed_tokens.weight"][token:token + 1])
        t_start = time.perf_counter()
        if span not in self._segs:
            self._segs[span] = self._segments(span)
            self._calls[span] = [run for _, _, run in self._segs[span]]
        segments = self._segs[span]
        if span not in self.chains and self.graphs:
            from kernels_gpu.graphs import GraphChain

            side = torch.cuda.Stream()  # warm-up off the default stream, as capture wants
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run(segments, self._calls[span])  # the real step, eagerly: this token's result
            torch.cuda.current_stream().wait_stream(side)
            logits = self.buf["logits"].clone()
            try:  # the outer stream context restores this stream even when a failed capture cannot
                with torch.cuda.stream(torch.cuda.current_stream()):
                    chain = GraphChain([run for _, _, run in segments], self.pool)
                self.chains[span] = chain
                self._calls[span] = [g.replay for g in chain.graphs]
            except Exception:  # keep decoding, eagerly, rather than fail every step from here on
                log.exception("capturing the decode step as CUDA graphs failed; decoding without them")
                self.graphs = False
        else:
            self._run(segments, self._calls[span])
            logits = self.buf["logits"].clone()
        cache.length = pos + 1
        self.steps += 1
        self.model.times["forward"] += time.perf_counter() - t_start
        return logits

    # ---- the host loop ------------------------------------------------------------------------
    def _run(self, segments: list[Segment], calls: list[Callable[[], None]]) -> None:
        """calls[k] runs segment k: the segment itself (eagerly) or its captured graph's replay."""
        times = self.model.times
        for (kind, layer, _), go in zip(segments, calls):
            t0 = time.perf_counter()
            if kind == "pre":
                go()
                if self.event is not None:
                    self.event.record()
                times["attention"] += time.perf_counter() - t0
            elif kind == "shared":
                if self.cuda:  # on the GPU's queue before the host blocks: overlaps the CPU experts
                    go()
                    self.event.synchronize()  # x, ids and weights are in the pinned buffers
                    t1 = time.perf_counter()
                    times["attention"] += t1 - t0  # the rest of pre[i], as the host waited for it
                    self._hop(layer, None)
                else:  # one CPU does both: submit first, so the shared expert overlaps the workers
                    self._hop(layer, go)
            else:
                go()
                if self.cuda:
                    torch.cuda.current_stream().synchronize()
                times["lm_head"] += time.perf_counter() - t0

    def _hop(self, layer: int, shared: Callable[[], None] | None) -> None:
        """The routed experts of `layer`: submit from the pinned buffers, collect into routed_h / routed_dev."""
        ex, times = self.model.experts, self.model.times
        x, ids, w = self.buf["x"], self.buf["ids"], self.buf["w"]  # layer's, until the next pre segment runs
        t0 = time.perf_counter()
        if hasattr(ex, "submit_host"):  # the scheduler reads the host copies: no device sync
            handle = ex.submit_host(layer, x, ids, w, *self._host_np[:3])
        else:
            handle = ex.submit(layer, x, ids, w)
        t1 = time.perf_counter()
        if shared is not None:
            shared()
        t2 = time.perf_counter()
        if hasattr(ex, "wait_host"):
            y_dev = ex.wait_host(handle, self._host_np[3])
        else:  # a generic backend hands back the whole routed sum on the device
            y_dev = ex.wait(handle)
            self.routed_h.zero_()
        if y_dev is not None:
            self.routed_dev.copy_(y_dev)
            self._routed_dev_used = True
        elif self._routed_dev_used:
            self.routed_dev.zero_()
            self._routed_dev_used = False
        times["submit"] += t1 - t0
        times["shared"] += t2 - t1
        times["experts_wait"] += time.perf_counter() - t2

    # ---- the segments ---------------------------------------------------------------------------
    def _segments(self, span: int) -> list[Segment]:
        m, cfg, b, cache = self.model, self.model.cfg, self.buf, self.cache
        w, eps, dev = m.w, cfg.rms_norm_eps, self.device
        moe = cfg.moe_layers

        def embed() -> None:
            tp = self.tp_h.to(dev, non_blocking=True)
            b["s0"].copy_(tp[1])  # the position, on the device
            cos, sin = m.rope(tp[1:2])
            b["cos"].copy_(cos)
            b["sin"].copy_(sin)
            b["h"].copy_(self.emb_h.to(dev, non_blocking=True))  # [1, D]

        def attend(i: int) -> None:
            h = b["h"]
            x = rms_norm(h, w[f"model.layers.{i}.input_layernorm.weight"], eps)
            h.copy_(h + m.attention(i, x, cache, b["s0"], b["cos"], b["sin"], "absorbed", span))

        def dense(first: int, end: int) -> None:  # whole layers first..end-1 with a dense MLP
            for i in range(first, end):
                attend(i)
                h = b["h"]
                x = rms_norm(h, w[f"model.layers.{i}.post_attention_layernorm.weight"], eps)
                # Model.dense_mlp's math, without its timer: this segment's time is counted whole
                h.copy_(h + m.ffn(f"model.layers.{i}.mlp.", x))

        def combine() -> None:  # h + (shared + routed), the order Model.moe adds them in
            h = b["h"]
            routed = (self.routed_h.to(dev, non_blocking=True) + self.routed_dev).to(h.dtype)
            h.copy_(h + (b["shared"] + routed))

        def pre(j: int) -> Callable[[], None]:
            i, before = moe[j], (moe[j - 1] + 1 if j else 0)

            def run() -> None:
                if j == 0:
                    embed()
                else:
                    combine()
                dense(before, i)
                attend(i)
                x = rms_norm(b["h"], w[f"model.layers.{i}.post_attention_layernorm.weight"], eps)
                ids, weights = m.route(i, x)
                b["x"].copy_(x)
                b["ids"].copy_(ids)
                b["w"].copy_(weights)
                self.x_h.copy_(x.float(), non_blocking=True)
                self.ids_h.copy_(ids, non_blocking=True)
                self.w_h.copy_(weights, non_blocking=True)
            return run

        def shared(i: int) -> Callable[[], None]:
            return lambda: b["shared"].copy_(m.shared_expert(i, b["x"]))

        def head() -> None:
            if moe:
                combine()
            else:
                embed()
            dense(moe[-1] + 1 if moe else 0, cfg.num_hidden_layers)
            b["logits"].copy_(m.head(b["h"]))

        segments: list[Segment] = []
        for j, i in enumerate(moe):
            segments += [("pre", i, pre(j)), ("shared", i, shared(i))]
        return segments + [("head", -1, head)]

