"""The device work of one decode token, cut into segments at the MoE layers (hybrid/decode_step.py runs them).

Owns what each segment computes from the decoder's fixed buffers: embed, attention, dense layers,
router and the copies into pinned host buffers (pre), the shared and hot experts (gpu / shared), the
sum of the previous layer's parts (combine) and the head. The math is the model's own; this file adds
none and launches nothing: the decoder runs, times and captures what it returns.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from hybrid.experts.hot import HotSlots, fused_kernel, hot_moe_by_slot

from hybrid.model.k2 import rms_norm

if TYPE_CHECKING:
    from hybrid.runtime.decode_step import StaticDecoder

Segment = tuple[str, int, Callable[[], None]]  # (kind, layer, run); kinds: pre submit gpu wait shared head


def build_segments(dec: "StaticDecoder", span: int) -> list[Segment]:
    """The step's segments for KV span `span`, in run order. Mode 'token': pre, submit, gpu, wait per
    MoE layer (submit and wait are the decoder's host functions), then head; mode 'segments': pre,
    shared per MoE layer, then head (the decoder hops on the host after each shared)."""
    m, cfg, b, cache = dec.model, dec.model.cfg, dec.buf, dec.cache
    w, eps, dev = m.w, cfg.rms_norm_eps, dec.device
    moe, token_mode = cfg.moe_layers, dec.mode == "token"
    ex = m.experts
    hot_sets = {i: h for i, h in getattr(ex, "hot", {}).items() if isinstance(h, HotSlots)} if token_mode else {}
    # the scheduler's rule and switch (fused_hot); without the kernel, the torch fixed-shape sum
    fused = fused_kernel(getattr(ex, "fused_hot", None), dec.cuda) if hot_sets else None

    def embed() -> None:
        tp = dec.tp_h.to(dev, non_blocking=True)
        b["s0"].copy_(tp[1])  # the position, on the device
        cos, sin = m.rope(tp[1:2])
        b["cos"].copy_(cos)
        b["sin"].copy_(sin)
        b["h"].copy_(dec.emb_h.to(dev, non_blocking=True))  # [1, D]

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

    def combine(prev: int) -> None:  # h + (shared + routed), the order Model.moe adds them in
        h = b["h"]
        routed = dec.routed_h.to(dev, non_blocking=True)
        if not token_mode or prev in hot_sets:  # token mode: only layers with hot experts wrote routed_dev
            routed = routed + dec.routed_dev
        h.copy_(h + (b["shared"] + routed.to(h.dtype)))

    def pre(j: int) -> Callable[[], None]:
        i, before = moe[j], (moe[j - 1] + 1 if j else 0)
        predict = token_mode and dec.predicting and i in ex.next_layer

        def run() -> None:
            if j == 0:
                embed()
            else:
                combine(moe[j - 1])
            dense(before, i)
            attend(i)
            x = rms_norm(b["h"], w[f"model.layers.{i}.post_attention_layernorm.weight"], eps)
            ids, weights = m.route(i, x)
            b["x"].copy_(x)
            b["ids"].copy_(ids)
            b["w"].copy_(weights)
            dec.x_h.copy_(x.float(), non_blocking=True)
            dec.ids_h.copy_(ids, non_blocking=True)
            dec.w_h.copy_(weights, non_blocking=True)
            if predict:  # the next layer's router on this input: what the host prefetches
                dec.cand_h.copy_(ex.predict(ex.next_layer[i], x, dec.cand_h.shape[0])[0], non_blocking=True)
        return run

    def shared(i: int) -> Callable[[], None]:
        return lambda: b["shared"].copy_(m.shared_expert(i, b["x"]))

    def on_device(i: int) -> Callable[[], None]:  # token mode: shared and hot experts of layer i
        slots = hot_sets.get(i)
        hot = fused or hot_moe_by_slot

        def run() -> None:
            b["shared"].copy_(m.shared_expert(i, b["x"]))
            if slots is not None:
                dec.routed_dev.copy_(hot(b["x"], b["ids"], b["w"], slots))
        return run

    def head() -> None:
        if moe:
            combine(moe[-1])
        else:
            embed()
        dense(moe[-1] + 1 if moe else 0, cfg.num_hidden_layers)
        b["logits"].copy_(m.head(b["h"]))

    segments: list[Segment] = []
    for j, i in enumerate(moe):
        if token_mode:
            segments += [("pre", i, pre(j)), ("submit", i, dec._submit(i)), ("gpu", i, on_device(i)),
                         ("wait", i, dec._wait(i))]
        else:
            segments += [("pre", i, pre(j)), ("shared", i, shared(i))]
    return segments + [("head", -1, head)]

