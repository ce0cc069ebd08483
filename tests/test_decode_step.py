"""The fixed-shape decode step (hybrid/runtime/decode_step.py) against the plain forward pass, in both of its
modes (one graph per token with the expert hops as host functions, and a graph per segment).

Without CUDA the step runs eagerly, which is the code a GPU captures: same segments, same
position-in-a-device-tensor attention over a fixed KV span, same hop through the host buffers, host
functions called in stream order. The oracle is Model.forward with the reference expert backend
(dequantised fp32 experts in torch).
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import hybrid
from hybrid.runtime.decode_step import BUCKET_MIN, StaticDecoder

CUDA = torch.cuda.is_available()
# Triton runs kernels on CPU tensors only in its interpreter (conftest turns it on where there is no CUDA)
TRITON_ON_CPU = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
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


@pytest.mark.parametrize("backend,tol,mode", [("reference", 1e-5, "segments"), ("numba", 1e-3, "segments"),
                                              ("numba", 1e-3, "token")])
def test_static_decode_equals_forward_across_buckets(tiny_path, backend, tol, mode):
    """40 steps from length 7 to 46 with bucket_min 8 cross spans 8, 16, 32 and 64 (the cache's cap).
    reference: same expert math, so only the padded softmax and summation order differ; numba: its
    int16-activation kernels (error ~5e-5 of the largest logit) against the fp32 oracle."""
    oracle = hybrid.load(tiny_path, backend="reference", device="cpu", context=64, decode_graphs="off")
    engine = hybrid.load(tiny_path, backend=backend, device="cpu", context=64, decode_graphs="off")
    ref_cache, cache = oracle.model.new_cache(64), engine.model.new_cache(64)
    dec = StaticDecoder(engine.model, cache, bucket_min=8, mode=mode)
    assert dec.mode == mode
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
    assert dec.mode == "segments"  # the reference backend has no host entry points for host functions
    with pytest.raises(ValueError, match="no host entry points"):
        StaticDecoder(eng.model, dec_cache, mode="token")
    assert [k for k, _, _ in dec._segments(32)] == ["pre", "shared"] * len(cfg.moe_layers) + ["head"]
    toks = forced_tokens(6, cfg.vocab_size)
    want = teacher_forced(eng.model, ref_cache, toks, lambda t: eng.model.forward(torch.tensor([t]), ref_cache))
    got = teacher_forced(eng.model, dec_cache, toks, dec.step)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5
    eng.close()
    eng = hybrid.load(path, backend="numba", expert_mode="mmap", device="cpu", context=32, decode_graphs="on")
    dec = eng.decoder
    assert dec.mode == "token"
    assert [k for k, _, _ in dec._segments(32)] == ["pre", "submit", "gpu", "wait"] * len(cfg.moe_layers) + ["head"]
    seg_cache = eng.model.new_cache(32)
    seg = StaticDecoder(eng.model, seg_cache, mode="segments")
    want = teacher_forced(eng.model, seg_cache, toks, seg.step)
    tok_cache = eng.model.new_cache(32)  # the engine's own cache holds bf16 pages; this one fp32 rows like seg_cache
    tok = StaticDecoder(eng.model, tok_cache)
    assert tok.mode == "token"
    got = teacher_forced(eng.model, tok_cache, toks, tok.step)
    for a, b in zip(got, want):  # the same numba experts and the same math, hopped to another way
        assert rel_err(a, b) < 1e-6
    eng.close()


@pytest.mark.parametrize("graphs", ["on", "segments"])
def test_engine_decode_graphs_on_with_cache_prefetch_and_hot_experts(tiny_path, graphs, monkeypatch):
    """The hop through the scheduler's host entry points: cache mode (misses loaded in waves), prefetch
    on, 2 hot experts per layer computed on the GPU side (here the CPU) and added through the device
    buffer. Three requests: the second starts with hot experts chosen from the first's routing, written
    into the same slots in place (the step is not rebuilt); the third has them on one layer only, through
    the fused Triton kernel. Token mode: the host functions (submit, wait) do no device work: the
    router's prefetch guess and the hot experts run in the step's device segments, never inside them."""
    oracle = hybrid.load(tiny_path, backend="reference", device="cpu", context=64, decode_graphs="off")
    eng = hybrid.load(tiny_path, backend="numba", device="cpu", context=64, expert_mode="cache", cache_slots=12,
                      prefetch=True, hot_experts=2, decode_graphs=graphs)
    dec, sched = eng.decoder, eng.model.experts
    assert dec.mode == ("token" if graphs == "on" else "segments")
    device_calls = []
    if graphs == "on":
        def outside_host_functions(fn):
            def run(*a, **k):
                assert not dec.host.running, f"{fn.__name__} ran inside a host function"
                device_calls.append(fn.__name__)
                return fn(*a, **k)
            run.__name__ = fn.__name__
            return run

        import hybrid.runtime.decode_segments as ds
        import hybrid.experts.hot as hx
        sched.predict = outside_host_functions(sched.predict)
        monkeypatch.setattr(ds, "hot_moe_by_slot", outside_host_functions(ds.hot_moe_by_slot))
        monkeypatch.setattr(hx, "hot_expert_moe", outside_host_functions(hx.hot_expert_moe))
        eng.model.shared_expert = outside_host_functions(eng.model.shared_expert)
    fused_calls = []
    if TRITON_ON_CPU:
        import kernels_gpu.int4_triton as kt
        real_fused = kt.fused_hot_moe
        monkeypatch.setattr(kt, "fused_hot_moe", lambda *a: (fused_calls.append(1), real_fused(*a))[1])
        import hybrid.experts.hot as hs
        hs._triton_kernel.cache_clear()  # imported afresh: the counting one
    slots = dict(sched.hot)  # the buffers made at load, empty
    V = eng.config.vocab_size
    for r, n in enumerate((10, 14, 8)):
        if r == 2:  # hot experts on the first MoE layer only: the device buffer must not carry its sum on
            assert all(sched.hot[layer] is s and len(s) == 2 for layer, s in slots.items())  # filled in place
            if graphs == "on":
                assert len(dec.host.fns) == 2 * len(eng.config.moe_layers)  # one build: never rebuilt
            eng.hot_experts = 0  # no refresh at the request's start
            eng.model.experts.set_hot(eng.config.moe_layers[-1], {})
            eng.model.experts.fused_hot = TRITON_ON_CPU  # decode's hot pairs through the Triton kernel (interpreted here)
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
    assert st["decode_graphs"] == {"mode": dec.mode, "cuda_graphs": False, "captured_buckets": [], "steps": 9 + 13 + 7}
    assert pairs > 0 and sched.hot_pairs > pairs  # requests 2 and 3 really split pairs between hot and CPU experts
    assert sum(s.prefetched for s in sched.cache.stats.values()) > 0
    if graphs == "on":
        assert {"<lambda>", "hot_moe_by_slot", "shared_expert"} <= set(device_calls)  # <lambda>: the loader's predict
    assert len(fused_calls) == (7 if TRITON_ON_CPU else 0)  # the third request's 7 decode steps, one hot layer each
    if TRITON_ON_CPU:
        hs._triton_kernel.cache_clear()  # forget the counting wrapper
    oracle.close()
    eng.close()


def test_token_mode_prefetches_what_the_segment_mode_predicts(tiny_path, tmp_path):
    """The router's guess for the next layer runs in the token step's device segment and reaches the
    scheduler through a pinned buffer: the predictions in the routing trace equal the ones segment
    mode makes, where the scheduler runs the router itself."""
    traces = {}
    for graphs in ("on", "segments"):
        trace = tmp_path / f"{graphs}.jsonl"
        eng = hybrid.load(tiny_path, backend="numba", device="cpu", context=64, expert_mode="cache", cache_slots=12,
                          prefetch=True, trace=trace, decode_graphs=graphs)
        list(eng.generate(PROMPT, 8, sampler=lambda lg: int(lg.argmax())))
        eng.close()
        traces[graphs] = [json.loads(line) for line in trace.read_text().splitlines()]
    on, seg = traces["on"], traces["segments"]
    n_moe = len(on) // 8  # records per step: one per MoE layer (the prefill is one call per layer)
    predicted = [r["predicted"] for r in on if r["predicted"] is not None]
    assert len(predicted) == 7 * (n_moe - 1)  # every decode step, every layer after the first
    assert [r["predicted"] for r in on] == [r["predicted"] for r in seg]
    assert [r["experts"] for r in on] == [r["experts"] for r in seg]


def eng_experts(path) -> int:
    return json.loads((path / "config.json").read_text())["n_routed_experts"]


def test_hot_experts_in_plain_dicts_send_the_step_to_segment_mode(tiny_path):
    """The token step computes hot experts from HotSlots only: a plain dict hot set (the scheduler's
    other form) makes it fall back to segment mode, still right, with the device buffer zeroed on the
    way; and the scheduler refuses device_hot with a dict rather than drop its sum."""
    from kernels_gpu.int4 import DeviceInt4

    oracle = hybrid.load(tiny_path, backend="reference", device="cpu", context=64, decode_graphs="off")
    eng = hybrid.load(tiny_path, backend="numba", device="cpu", context=64, expert_mode="mmap",
                      hot_experts=eng_experts(tiny_path), decode_graphs="on")  # all hot: the device sum is never 0
    dec, sched, ckpt = eng.decoder, eng.model.experts, eng.checkpoint
    toks = forced_tokens(6, eng.config.vocab_size)
    first, layer = eng.config.moe_layers[0], eng.config.moe_layers[-1]
    for r in range(3):
        if r == 2:  # none on the first MoE layer (its hop adds no device sum), a plain dict on the last
            eng.hot_experts = 0
            sched.set_hot(first, {})
            sched.set_hot(layer, {e: tuple(DeviceInt4.from_arrays(w.packed, w.scale, w.shape) for w in
                                           (ckpt.expert(layer, e, p) for p in ("gate_proj", "up_proj", "down_proj")))
                                  for e in (0, 1, 2)})
        got, want = [], []
        for eng_, out in ((eng, got), (oracle, want)):
            it = iter(toks)
            list(eng_.generate([r + 1] + PROMPT, 6, sampler=lambda lg, it=it, out=out: (out.append(lg), next(it))[1]))
        assert dec.mode == ("token" if r < 2 else "segments")
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-3
    b = dec.bufs
    with pytest.raises(ValueError, match="plain dict"):
        sched.submit_host(layer, b.x, b.ids, b.w, b.x_np, b.ids_np, b.w_np, device_hot=True)
    oracle.close()
    eng.close()


def test_decode_graphs_auto_is_off_without_cuda_and_options_are_checked(tiny_path):
    eng = hybrid.load(tiny_path, backend="reference", device="cpu", context=32)
    assert eng.decoder is None and eng.stats()["decode_graphs"] is None
    eng.close()
    with pytest.raises(ValueError, match="decode_graphs must be"):
        hybrid.load(tiny_path, decode_graphs="yes")
    for graphs in ("on", "segments"):
        with pytest.raises(ValueError, match="defer_experts"):
            hybrid.load(tiny_path, decode_graphs=graphs, defer_experts=1)
    with pytest.raises(ValueError, match="mode must be one of"):
        StaticDecoder(None, None, mode="graph")


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
@pytest.mark.parametrize("graphs", ["on", "segments"])
def test_cuda_graph_decode_equals_eager_on_cuda(tiny_path, graphs):
    """On CUDA: the captured step (one graph per token, or per segment) against the plain forward in
    bf16, over three requests: a long prompt (bucket 512 captured, then replayed), a short one (bucket
    256, after 512: the buckets share the segment buffers), then the long one again (512 replayed,
    prefix reuse). 4 hot experts per layer, chosen at the second request's start and written into
    their slots in place under the captured graphs; the plain engine computes every expert on the CPU."""
    plain = hybrid.load(tiny_path, backend="numba", device="cuda", context=600, decode_graphs="off", hot_experts=0)
    graphed = hybrid.load(tiny_path, backend="numba", device="cuda", context=600, decode_graphs=graphs, hot_experts=4)
    triton = importlib.util.find_spec("triton") is not None  # hot experts in the token graph need it
    assert graphed.decoder.graphs and graphed.decoder.mode == ("token" if graphs == "on" and triton else "segments")
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
    assert st["cuda_graphs"] and st["captured_buckets"] == [256, 512] and st["mode"] == graphed.decoder.mode
    assert graphed.model.experts.hot_pairs > 0
    plain.close()
    graphed.close()


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs Triton (in [dev] on x86-64 Linux)")
def test_token_step_with_int8_weights_through_the_triton_gemv(tiny_path, monkeypatch):
    """What CUDA runs for an int8 plan: the token step's one-row linears go through
    kernels_gpu.int8_triton (here in Triton's interpreter), the prompt's through the dequantising
    path; the logits equal the plain forward's over the same int8 weights (on this CPU through
    kernels_cpu.widen.int8_gemv). lm_head stays dense here: its 163,840 rows are too many programs
    for the interpreter."""
    import hybrid.model.linear as linear_mod
    import kernels_gpu.int8 as int8_mod
    import kernels_gpu.int8_triton as int8_triton
    from hybrid.runtime.gpu_side import gpu_side_weight
    from hybrid.model.k2 import Model

    eng = hybrid.load(tiny_path, backend="numba", device="cpu", context=32, decode_graphs="off")
    qw = {k: v if k == "lm_head.weight" else gpu_side_weight(k, v, v.device, v.dtype, int8=True)
          for k, v in eng.model.w.items()}
    plain, stepped = Model(eng.config, qw, eng.model.experts), Model(eng.config, qw, eng.model.experts)
    ref_cache, cache = plain.new_cache(32), stepped.new_cache(32)
    toks = forced_tokens(4, eng.config.vocab_size)
    want = teacher_forced(plain, ref_cache, toks, lambda t: plain.forward(torch.tensor([t]), ref_cache))
    calls, gemv = [], int8_triton.int8_gemv
    monkeypatch.setattr(int8_triton, "int8_gemv", lambda x, q, scale: (calls.append(x.shape[0]), gemv(x, q, scale))[1])
    monkeypatch.setattr(int8_mod, "pick_kernel", lambda dev, dt, rows: "triton" if rows == 1 else "plain")
    monkeypatch.setattr(linear_mod, "_int8_cpu", int8_mod.int8_linear)  # linear() as on CUDA: int8_linear decides
    monkeypatch.setattr(linear_mod, "decode_weights", lambda x, ws: None)  # and no fused CPU products (x is on CUDA there)
    dec = StaticDecoder(stepped, cache, bucket_min=8, mode="token")
    got = teacher_forced(stepped, cache, toks, dec.step)
    n_int8 = sum(isinstance(w, tuple) for w in qw.values())
    assert len(calls) == 4 * n_int8 and set(calls) == {1} and dec.steps == 4  # each int8 linear, each step
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4
    eng.close()


def test_static_decode_times_each_stretch_once(tiny_path):
    """Engine.stats() adds attention, router, shared, dense and lm_head into gpu_side: in the static
    step the segments are timed whole, so the model's own per-part timers must stay out of it."""
    eng = hybrid.load(tiny_path, backend="numba", device="cpu", context=32, decode_graphs="on")
    list(eng.generate(PROMPT, 2, sampler=lambda lg: 3))  # prefill (plain forward), then one static step
    eng.model.times.clear()
    list(eng.generate(PROMPT + [3], 2, sampler=lambda lg: 3))  # the cache holds it all: the last token again, one step
    t = eng.model.times
    assert eng.decoder.steps == 2  # one per request: the one-token prefill is a plain forward
    assert t.attention > 0 and t.shared > 0 and t.experts_wait > 0 and t.lm_head > 0
    eng.model.times.clear()
    eng.decoder.step(5)
    assert t.dense == t.router == 0  # counted inside the segments' time, not again
    assert t.attention + t.submit + t.shared + t.experts_wait + t.lm_head <= t.forward
    eng.close()


@pytest.mark.parametrize("where", ["submit_host", "wait_host", "shared_expert"])
def test_token_step_raises_what_a_host_function_raised_and_then_goes_on(tiny_path, where):
    """An error inside a host function (an expert read failing, say) cannot unwind through the CUDA
    driver: the step keeps it, finishes the token without that layer's CPU share, raises it, and
    leaves the cache length alone; the next step is whole again. An error in a device segment
    (shared_expert) stops the token at once; the step drops what its host functions left."""
    # fp32 pages: the engine's paged cache against a contiguous fp32 one, the same values
    eng = hybrid.load(tiny_path, backend="numba", expert_mode="mmap", device="cpu", context=32, decode_graphs="on",
                      kv_dtype="fp32")
    dec, sched = eng.decoder, eng.model.experts
    assert dec.mode == "token"
    ref_cache = eng.model.new_cache(32)
    seg = StaticDecoder(eng.model, ref_cache, mode="segments")
    eng.model.forward(torch.tensor(PROMPT), eng._cache)
    eng.model.forward(torch.tensor(PROMPT), ref_cache)
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("expert shard unreadable")
        return real(*a, **k)

    owner = eng.model if where == "shared_expert" else sched
    real = getattr(owner, where)
    setattr(owner, where, failing)
    with pytest.raises(OSError, match="expert shard unreadable"):
        dec.step(3)
    n_moe = len(eng.config.moe_layers)
    assert eng._cache.length == len(PROMPT) and dec.steps == 0 and len(calls) == (1 if where == "shared_expert" else n_moe)
    assert dec.host.error is None and not dec._handles and not dec.host.cancelled
    # the engine's fp32 pages against a contiguous fp32 cache: one score GEMM over [latent, key] rows
    # instead of two, so the sums differ in order only
    assert rel_err(dec.step(3), seg.step(3)) < 1e-4
    eng.close()
