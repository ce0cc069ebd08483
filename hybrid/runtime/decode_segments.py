"""The device work of one decode token, cut into segments at the MoE layers (decode_step.py runs them).

Owns the order of the model's pieces in a fixed-shape step and the copies between them and the
step's buffers (decode_buffers.StepBuffers). Every piece of math is a hybrid.model.k2 function called
as Model.forward calls it; this file adds none and launches nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hybrid.experts.hot import HotSlots, fused_kernel, hot_moe_by_slot
from hybrid.model.k2 import Cache, Model, moe_sum
from hybrid.runtime.decode_buffers import StepBuffers

Run = Callable[[], None]
Segment = tuple[str, int, Run]  # (kind, layer, run); kinds: pre submit gpu wait shared head


@dataclass(frozen=True)
class HostHops:
    """Mode 'token': the decoder's makers of MoE layer i's host functions, placed around its device work."""
    submit: Callable[[int], Run]
    wait: Callable[[int], Run]


def build_segments(model: Model, cache: Cache, bufs: StepBuffers, span: int, hops: HostHops | None) -> list[Segment]:
    """The step's segments for KV span `span`, in run order. With hops (mode 'token'): pre, submit, gpu,
    wait per MoE layer, then head; without (mode 'segments'): pre, shared per MoE layer, then head
    (the decoder hops on the host after each shared)."""
    s = StepSegments(model, cache, bufs, span, hops is not None)
    segments: list[Segment] = []
    for j, i in enumerate(model.cfg.moe_layers):
        if hops is not None:
            segments += [("pre", i, s.pre(j)), ("submit", i, hops.submit(i)), ("gpu", i, s.on_device(i)),
                         ("wait", i, hops.wait(i))]
        else:
            segments += [("pre", i, s.pre(j)), ("shared", i, s.shared(i))]
    return segments + [("head", -1, s.head)]


class StepSegments:
    """What the segments of one span run: the model's pieces over fixed shapes, with the position in
    a device tensor and the KV cache read through `span` rows."""

    def __init__(self, model: Model, cache: Cache, bufs: StepBuffers, span: int, token_mode: bool):
        self.m, self.cache, self.b, self.span = model, cache, bufs, span
        self.moe, self.token_mode = model.cfg.moe_layers, token_mode
        ex = model.experts
        # token mode computes the hot experts of HotSlots layers itself (segment mode leaves them to the hop)
        self.hot_sets = {i: h for i, h in ex.hot.items() if isinstance(h, HotSlots)} if token_mode else {}
        # the backend's switch (fused_hot); without the kernel, the torch fixed-shape sum
        fused = fused_kernel(ex.fused_hot, model.device.type == "cuda") if self.hot_sets else None
        self.hot_moe = fused or hot_moe_by_slot
        self.predicting = token_mode and ex.prefetch_width > 0  # segment mode: the hop's submit predicts

    def embed(self) -> None:  # Model.forward's rope and embed, from the pinned token, position and row
        b, dev = self.b, self.m.device
        tp = b.tp_h.to(dev, non_blocking=True)
        b.s0.copy_(tp[1])  # the position, on the device
        cos, sin = self.m.rope(tp[1:2])
        b.cos.copy_(cos)
        b.sin.copy_(sin)
        b.h.copy_(b.emb_h.to(dev, non_blocking=True))  # [1, D]

    def attend(self, i: int) -> torch.Tensor:
        """Layer i's attention_block over the fixed span; the residual into b.h -> the MLP's input x."""
        b = self.b
        h, x = self.m.attention_block(i, b.h, self.cache, b.s0, b.cos, b.sin, "absorbed", self.span)
        b.h.copy_(h)
        return x

    def dense(self, first: int, end: int) -> None:  # whole layers first..end-1 with a dense MLP
        b, m = self.b, self.m
        for i in range(first, end):
            h, x = m.attention_block(i, b.h, self.cache, b.s0, b.cos, b.sin, "absorbed", self.span)
            b.h.copy_(h + m.dense_mlp(i, x))

    def combine(self, prev: int) -> None:  # MoE layer prev's output into the residual, as Model.forward adds it
        b = self.b
        routed = b.routed_h.to(self.m.device, non_blocking=True)
        if not self.token_mode or prev in self.hot_sets:  # token mode: only layers with hot experts wrote b.routed
            routed = routed + b.routed
        b.h.copy_(b.h + moe_sum(b.shared, routed))

    def pre(self, j: int) -> Run:
        """Up to MoE layer moe[j]'s experts: the previous MoE layer's output (or the embedding), any
        dense layers between, attention, router; x, ids and weights copied for the host."""
        i, before = self.moe[j], (self.moe[j - 1] + 1 if j else 0)
        m, b, ex = self.m, self.b, self.m.experts
        nxt = ex.next_layer.get(i) if self.predicting else None

        def run() -> None:
            if j == 0:
                self.embed()
            else:
                self.combine(self.moe[j - 1])
            self.dense(before, i)
            x = self.attend(i)
            ids, weights = m.route(i, x)
            b.x.copy_(x)
            b.ids.copy_(ids)
            b.w.copy_(weights)
            b.x_h.copy_(x.float(), non_blocking=True)
            b.ids_h.copy_(ids, non_blocking=True)
            b.w_h.copy_(weights, non_blocking=True)
            if nxt is not None:  # the next layer's router on this input: what the host prefetches
                b.cand_h.copy_(ex.predict(nxt, x, b.cand_h.shape[0])[0], non_blocking=True)
        return run

    def shared(self, i: int) -> Run:  # segment mode: the shared expert, while the host hops
        b, m = self.b, self.m
        return lambda: b.shared.copy_(m.shared_expert(i, b.x))

    def on_device(self, i: int) -> Run:
        """Token mode: MoE layer i's shared expert and its hot experts, while the CPU works."""
        b, m, slots, hot = self.b, self.m, self.hot_sets.get(i), self.hot_moe

        def run() -> None:
            b.shared.copy_(m.shared_expert(i, b.x))
            if slots is not None:
                b.routed.copy_(hot(b.x, b.ids, b.w, slots))
        return run

    def head(self) -> None:  # the last MoE layer's output, the dense layers after it, final norm, lm_head
        if self.moe:
            self.combine(self.moe[-1])
        else:
            self.embed()
        self.dense(self.moe[-1] + 1 if self.moe else 0, self.m.cfg.num_hidden_layers)
        self.b.logits.copy_(self.m.head(self.b.h))
