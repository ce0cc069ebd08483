"""The fixed-shape decode step (hybrid/decode_step.py) against the plain forward pass.

Without CUDA the segments run eagerly, which is the code a GPU captures: same segments, same
position-in-a-device-tensor attention over a fixed KV span, same hop through the host buffers. The
oracle is Model.forward with the reference expert backend (dequantised fp32 experts in torch).
"""
from __future__ import annotations

import pytest
import torch

import hybrid
from hybrid.decode_step import BUCKET_MIN, StaticDecoder

CUDA = torch.cuda.is_available()
PROMPT = [5, 17, 300, 42, 7, 901]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def teacher_forced(model, cache, tokens: list[int], step) -> list[torch.Tensor]:
    """Prefill PROMPT with the plain forward, then feed `tokens` one at a time through step(token)."""
    out = [model.forward(torch.tensor(PROMPT), cache)[-1]]
    for t in tokens:
        out.append(step(t)[-1])
    return out


def forced_tokens(n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("backend,tol", [("reference", 1e-5), ("numba", 1e-3)])
def test_static_decode_equals_forward_across_buckets(tiny_path, backend, tol):
    """40 steps from length 7 to 46 with bucket_min 8 cross spans 8, 16, 32 and 64 (the cache's cap).
    reference: same expert math, so only the padded softmax and summation order differ; numba: its
    int16-activation kernels (error ~5e-5 of the largest logit) against the fp32 oracle."""
    oracle = hybrid.load(tiny_path, backend="reference", device="cpu", context=64, decode_graphs="off")
    engine = hybrid.load(tiny_path, backend=backend, device="cpu", context=64, decode_graphs="off")
    ref_cache, cache = oracle.model.new_cache(64), engine.model.new_cache(64)
    dec = StaticDecoder(engine.model, cache, bucket_min=8)
    toks = forced_tokens(40, oracle.config.vocab_size)
    want = teacher_forced(oracle.model, ref_cache, toks, lambda t: oracle.model.forward(torch.tensor([t]), ref_cache))
    spans = []
    got = teacher_forced(engine.model, cache, toks,
                         lambda t: (spans.append(dec.bucket(cache.length + 1)), dec.step(t))[1])
    assert sorted(set(spans)) == [8, 16, 32, 64]
    assert dec.steps == 40 and cache.length == ref_cache.length == len(PROMPT) + 40
    for a, b in zip(got, want):
        assert rel_err(a, b) < tol
    # the latent cache rows the decoder wrote by index equal the ones the forward wrote by slice
    n = cache.length
    assert rel_err(cache.kv[:, :n], ref_cache.kv[:, :n]) < tol
    assert rel_err(cache.pe[:, :n], ref_cache.pe[:, :n]) < tol
    oracle.close()
    engine.close()


@pytest.mark.parametrize("over", [
    dict(num_hidden_layers=4, moe_layer_freq=2),  # dense layers 0, 1 before, 3 after the one MoE layer (2)
    dict(num_hidden_layers=5, first_k_dense_replace=2, moe_layer_freq=2, n_shared_experts=0),  # MoE 2, 4; no shared
])
def test_static_decode_segments_follow_the_layer_pattern(make_checkpoint, over):
    path = make_checkpoint(**over)
    eng = hybrid.load(path, backend="reference", device="cpu", context=32, decode_graphs="off")
    cfg = eng.config
    dec_cache, ref_cache = eng.model.new_cache(32), eng.model.new_cache(32)
    dec = StaticDecoder(eng.model, dec_cache)
    assert [k for k, _, _ in dec._segments(32)] == ["pre", "shared"] * len(cfg.moe_layers) + ["head"]
    toks = forced_tokens(6, cfg.vocab_size)
    want = teacher_forced(eng.model, ref_cache, toks, lambda t: eng.model.forward(torch.tensor([t]), ref_cache))
    got = teacher_forced(eng.model, dec_cache, toks, dec.step)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5
    eng.close()


def test_engine_decode_graphs_on_with_cache_prefetch_and_hot_experts(tiny_path):
    """The hop through the scheduler's host entry points: cache mode (misses loaded in waves), prefetch
    on, 2 hot experts per layer computed on the GPU side (here the CPU) and added through the device
    buffer. Two requests, so the second starts with hot experts chosen from the first's routing."""
    oracle = hybrid.load(tiny_path, backend="reference", device="cpu", context=64, decode_graphs="off")
    eng = hybrid.load(tiny_path, backend="numba", device="cpu", context=64, expert_mode="cache", cache_slots=12,
                      prefetch=True, hot_experts=2, decode_graphs="on")
    assert eng.decoder is not None
    V = eng.config.vocab_size
    for r, n in enumerate((10, 14, 8)):
        if r == 2:  # hot experts on the first MoE layer only: the device buffer must not carry its sum on
            eng.hot_experts = 0  # no refresh at the request's start
            eng.model.experts.set_hot(eng.config.moe_layers[-1], {})
            eng.model.experts.fused_hot = True  # and decode's hot pairs through the Triton kernel (interpreted here)
            pairs = eng.model.experts.hot_pairs
        toks = forced_tokens(n, V)
        prompt = [r + 1] + PROMPT  # a different first token: no prefix reuse between the two

        def forced(seen: list) -> object:
            it = iter(toks)
            return lambda logits: (seen.append(logits.clone()), next(it))[1]

        got, want = [], []
        list(eng.generate(prompt, n, sampler=forced(got)))
        list(oracle.generate(prompt, n, sampler=forced(want)))
        assert len(got) == len(want) == n
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-3
    st = eng.stats()
    # the split's parts are disjoint stretches of the forward pass: never counted twice
    assert st["gpu_side_s"] + st["experts_wait_s"] + st["submit_s"] <= st["forward_s"] + 1e-6
    assert st["decode_graphs"] == {"cuda_graphs": False, "captured_buckets": [], "steps": 9 + 13 + 7}
    sched = eng.model.experts
    assert pairs > 0 and sched.hot_pairs > pairs  # requests 2 and 3 really split pairs between hot and CPU experts
    assert sum(s.prefetched for s in sched.cache.stats.values()) > 0
    oracle.close()
    eng.close()


def test_decode_graphs_auto_is_off_without_cuda_and_options_are_checked(tiny_path):
    eng = hybrid.load(tiny_path, backend="reference", device="cpu", context=32)
    assert eng.decoder is None and eng.stats()["decode_graphs"] is None
    eng.close()
    with pytest.raises(ValueError, match="decode_graphs must be"):
        hybrid.load(tiny_path, decode_graphs="yes")
    with pytest.raises(ValueError, match="defer_experts"):
        hybrid.load(tiny_path, decode_graphs="on", defer_experts=1)


def test_static_decode_refuses_a_full_cache_and_bad_tokens(tiny_path):
    eng = hybrid.load(tiny_path, backend="reference", device="cpu", context=32, decode_graphs="off")
    cache = eng.model.new_cache(len(PROMPT))
    eng.model.forward(torch.tensor(PROMPT), cache)
    dec = StaticDecoder(eng.model, cache)
    with pytest.raises(ValueError, match="exceed the KV cache"):
        dec.step(1)
    cache.truncate(2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dec.step(eng.config.vocab_size)
    assert cache.length == 2 and dec.steps == 0
    eng.model.defer_experts = 1
    with pytest.raises(ValueError, match="defer_experts"):
        StaticDecoder(eng.model, cache)
    eng.close()


def test_bucket_is_a_power_of_two_capped_by_the_cache(tiny_path):
    eng = hybrid.load(tiny_path, backend="reference", device="cpu", context=1000, decode_graphs="off")
    dec = StaticDecoder(eng.model, eng.model.new_cache(1000))
    assert [dec.bucket(n) for n in (1, BUCKET_MIN, BUCKET_MIN + 1, 513, 999, 1000)] == \
        [BUCKET_MIN, BUCKET_MIN, 2 * BUCKET_MIN, 1000, 1000, 1000]
    eng.close()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_decode_equals_eager_on_cuda(tiny_path):
    """On CUDA: the captured segments against the plain forward in bf16, over three requests: a long
    prompt (bucket 512 captured, then replayed), a short one (bucket 256, after 512: the buckets share
    the segment buffers), then the long one again (512 replayed, prefix reuse)."""
    plain = hybrid.load(tiny_path, backend="numba", device="cuda", context=600, decode_graphs="off")
    graphed = hybrid.load(tiny_path, backend="numba", device="cuda", context=600, decode_graphs="on")
    assert graphed.decoder.graphs
    toks = forced_tokens(20, plain.config.vocab_size)
    for prompt in (PROMPT * 50, PROMPT, PROMPT * 50):
        seen: dict = {}
        for name, eng in (("plain", plain), ("graphed", graphed)):
            it, out = iter(toks), seen.setdefault(name, [])
            list(eng.generate(prompt, 20, sampler=lambda lg, it=it, out=out: (out.append(lg.float().cpu()), next(it))[1]))
        assert len(seen["graphed"]) == 20
        for a, b in zip(seen["graphed"], seen["plain"]):
            assert rel_err(a, b) < 2e-2  # bf16 GPU side; the padded softmax reorders sums
    st = graphed.stats()["decode_graphs"]
    assert st["cuda_graphs"] and st["captured_buckets"] == [256, 512]
    plain.close()
    graphed.close()


def test_static_decode_times_each_stretch_once(tiny_path):
    """Engine.stats() adds attention, router, shared, dense and lm_head into gpu_side: in the static
    step the segments are timed whole, so the model's own per-part timers must stay out of it."""
    eng = hybrid.load(tiny_path, backend="numba", device="cpu", context=32, decode_graphs="on")
    list(eng.generate(PROMPT, 2, sampler=lambda lg: 3))  # prefill (plain forward), then one static step
    eng.model.times.clear()
    list(eng.generate(PROMPT + [3], 2, sampler=lambda lg: 3))  # the cache holds it all: the last token again, one step
    t = eng.model.times
    assert eng.decoder.steps == 2  # one per request: the one-token prefill is a plain forward
    assert t["attention"] > 0 and t["shared"] > 0 and t["experts_wait"] > 0 and t["lm_head"] > 0
    eng.model.times.clear()
    eng.decoder.step(5)
    assert t["dense"] == t["router"] == 0  # counted inside the segments' time, not again
    assert t["attention"] + t["submit"] + t["shared"] + t["experts_wait"] + t["lm_head"] <= t["forward"]
    eng.close()
