"""Invariants of the forward pass: absorbed MLA == naive MLA; prefill N then decode M == full N+M."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hybrid


def test_absorbed_equals_naive(tiny_path):
    e = hybrid.load(tiny_path)
    ids = torch.arange(3, 40)
    a = e.logits(ids, attn="absorbed")
    n = e.logits(ids, attn="naive")
    assert (a - n).abs().max() <= 1e-4 * n.abs().max()


def test_prefill_then_decode_equals_full_forward(tiny_path):
    e = hybrid.load(tiny_path)
    ids = torch.randint(0, e.config.vocab_size, (20,), generator=torch.Generator().manual_seed(3))
    full = e.logits(ids)
    cache = e.model.new_cache(32)
    parts = [e.model.forward(ids[:12], cache)]  # prefill (naive form)
    for t in range(12, 20):
        parts.append(e.model.forward(ids[t:t + 1], cache))  # decode (absorbed form)
    inc = torch.cat(parts)
    assert cache.length == 20
    assert (inc - full).abs().max() <= 1e-4 * full.abs().max()


def test_last_only_gives_the_last_row(tiny_path):
    e = hybrid.load(tiny_path, backend="reference")
    ids = torch.arange(3, 20)
    full = e.model.forward(ids, e.model.new_cache(32))
    last = e.model.forward(ids, e.model.new_cache(32), last_only=True)
    assert last.shape == (1, e.config.vocab_size)
    assert float((last[0] - full[-1]).abs().max()) <= 1e-5 * float(full[-1].abs().max())  # GEMV vs GEMM sums
    e.close()


def test_decode_rope_and_embedding_equal_the_direct_ones(tiny_path):
    """A decode step's cos / sin from rope_rows' table and its embedding row widened in NumPy: bit for bit what rope
    over the positions and torch's gather and conversion give (with K2's real frequencies too), across the
    table's growth."""
    from hybrid.checkpoint.config import ModelConfig
    from hybrid.model.k2 import ROPE_BLOCK, yarn_inv_freq
    from tests.conftest import REAL_CONFIG

    e = hybrid.load(tiny_path)
    m = e.model
    k2 = yarn_inv_freq(ModelConfig.from_file(REAL_CONFIG))
    for inv_freq in (m.inv_freq, k2):
        m.inv_freq, m._rope_table = inv_freq, None
        for s0 in [0, 1, 7, ROPE_BLOCK - 1, ROPE_BLOCK, 3 * ROPE_BLOCK + 5, 9000, 5, 65530]:
            for T in (1, 3, 8):
                got, want = m.rope_rows(s0, T), m.rope(torch.arange(s0, s0 + T))
                assert all(torch.equal(g, w) for g, w in zip(got, want)), (s0, T)
    table = m.weights.embed_tokens
    ids = torch.tensor([0, 5, e.config.vocab_size - 1, 5])
    assert table.dtype == torch.bfloat16
    assert torch.equal(m.embed(ids), table[ids].to(torch.float32))


def test_logits_rejects_bad_ids(tiny_path):
    e = hybrid.load(tiny_path)
    with pytest.raises(ValueError, match="token ids must lie"):
        e.logits([0, e.config.vocab_size])
    with pytest.raises(ValueError, match="non-empty"):
        e.logits([])


def test_chunked_long_prompt_attention_equals_the_direct_form(tiny_path, monkeypatch):
    """Above CHUNKED_MIN_SCORES the naive form goes through kernels_gpu's chunked prefill (no T x S matrix)."""
    import hybrid.model.k2 as model

    e = hybrid.load(tiny_path, backend="reference")
    ids = torch.randint(0, e.config.vocab_size, (40,), generator=torch.Generator().manual_seed(9))
    direct = e.logits(ids, attn="naive")
    calls = []
    real = model.chunked_prefill_attention
    monkeypatch.setattr(model, "CHUNKED_MIN_SCORES", 100)
    monkeypatch.setattr(model, "chunked_prefill_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k, q_chunk=16, k_block=16))
    chunked = e.logits(ids, attn="naive")
    assert calls  # the chunked kernel ran, with blocks smaller than the prompt
    assert (chunked - direct).abs().max() <= 1e-4 * direct.abs().max()


def test_bf16_prompt_math_tracks_fp32_and_leaves_decode_alone(tiny_path, monkeypatch):
    """An engine loaded with cpu_prompt_math='bf16' prefills within bf16 rounding of the fp32 engine's
    logits (and not bit-equal: the math changed), and decodes a single token exactly as it does."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # torch computes bf16 on any CPU
    f32 = hybrid.load(tiny_path, device="cpu")
    b16 = hybrid.load(tiny_path, device="cpu", cpu_prompt_math="bf16")
    assert (f32.model.prompt_math, b16.model.prompt_math) == ("fp32", "bf16")
    ids = torch.randint(0, f32.config.vocab_size, (30,), generator=torch.Generator().manual_seed(11))
    want, got = f32.logits(ids), b16.logits(ids)
    # per position, within the bounds a bf16 GPU side is held to (test_bf16_gpu_side_runs_every_attention_form_
    # and_tracks_fp32): the random tiny model's sharp routing turns a rounding into another expert now and then
    err = (got - want).abs().max(-1).values / want.abs().max(-1).values
    assert float(err.median()) < 3e-2 and float(err.max()) < 0.5 and float(err.min()) > 0
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    # one token over the same cache (prefilled in fp32 for both): the decode path, fp32 in both
    c1, c2 = f32.model.new_cache(40), b16.model.new_cache(40)
    f32.model.forward(ids[:29], c1)
    f32.model.forward(ids[:29], c2)
    assert torch.equal(f32.model.forward(ids[29:], c1), b16.model.forward(ids[29:], c2))
    with pytest.raises(ValueError, match="cpu_prompt_math must be one of"):
        hybrid.load(tiny_path, device="cpu", cpu_prompt_math="fp16")


def test_few_tokens_over_a_long_context_take_the_chunked_form(tiny_path, monkeypatch):
    """A short turn after a long history expands keys and values a block at a time: the naive form
    would expand every cache position per head (K2: 64 KB each in fp32, 13 GB at 200 K)."""
    import hybrid.model.k2 as model

    e = hybrid.load(tiny_path, backend="reference")
    ids = torch.randint(0, e.config.vocab_size, (40,), generator=torch.Generator().manual_seed(10))
    cache = e.model.new_cache(64)
    e.model.forward(ids[:28], cache)
    direct = e.model.forward(ids[28:], cache, attn="naive")  # 12 tokens over 40 keys
    calls = []
    real = model.chunked_prefill_attention
    monkeypatch.setattr(model, "NAIVE_MAX_KEYS", 32)
    monkeypatch.setattr(model, "chunked_prefill_attention",
                        lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k, k_block=16))
    cache = e.model.new_cache(64)
    e.model.forward(ids[:28], cache)  # 28 keys: the naive form
    assert not calls
    bounded = e.model.forward(ids[28:], cache, attn="naive")
    assert calls and set(calls) == {12}
    assert (bounded - direct).abs().max() <= 1e-4 * direct.abs().max()


@pytest.mark.parametrize("tiles", [False, True])
def test_int8_weight_only_gpu_weights_cost_no_more_than_their_precision(tiny_path, make_checkpoint, tiles):
    """The planner's int8 weight-only option (short VRAM). The random tiny model amplifies query errors
    (sharp attention), so the bound is relative: int8 must do no worse than perturbing every weight by
    noise of the same size (uniform within half an int8 step), which is the precision int8 allows. With
    tiles: a model whose hidden size (512) lets the CPU hold q_a, kv_a, the MLPs' gate and up and lm_head as
    int8tiles' tiles (their prompt products untiled a block at a time, their decode GEMVs over the tiles)."""
    from hybrid.runtime.gpu_side import gpu_side_weight
    from hybrid.model.k2 import Model
    from kernels_cpu.simd import host_has_avx2

    if tiles and not host_has_avx2():
        pytest.skip("int8 tiles are held only where the CPU runs their kernel (AVX2)")
    e = hybrid.load(make_checkpoint(hidden_size=512) if tiles else tiny_path, backend="reference")
    ids = torch.arange(3, 30)
    exact = e.logits(ids)
    dtype = (lambda v: torch.float32) if tiles else (lambda v: v.dtype)  # tiles: as int8w holds them (fp32 math)
    qw = {k: gpu_side_weight(k, v, v.device, dtype(v), int8=True) for k, v in e.model.w.items()}
    assert isinstance(qw["model.layers.1.self_attn.o_proj.weight"], tuple)
    assert (qw["model.layers.1.self_attn.q_a_proj.weight"][0].dim() == 4) == tiles
    assert not isinstance(qw["model.layers.1.self_attn.kv_b_proj.weight"], tuple)  # read as per-head views
    q = Model(e.config, qw, e.model.experts)
    err_int8 = float((q.forward(ids, q.new_cache(32)) - exact).abs().max())
    g = torch.Generator().manual_seed(0)
    noisy = {}
    for k, v in e.model.w.items():
        if isinstance(qw[k], tuple):
            step = qw[k][1].float()[:, None]  # the row's int8 step
            v = v + (torch.rand(v.shape, generator=g) - 0.5) * step
        noisy[k] = v
    n = Model(e.config, noisy, e.model.experts)
    err_noise = float((n.forward(ids, n.new_cache(32)) - exact).abs().max())
    assert 0 < err_int8 <= 2 * err_noise
    # decoding over the same int8 weights (one row: kernels_cpu.widen.int8_gemv on this CPU) continues
    # the full forward: prefill 20, then 7 single steps
    import hybrid.model.cpu_step as cpu_step_mod
    import hybrid.model.linear as linear_mod

    calls = []  # rows of x, once per int8 weight a kernel call reads (the fused ones read 2 or 3)

    def counted(fn, n):
        return lambda *a: (calls.extend([a[0].shape[0]] * (n if a[1].dtype == np.int8 else 0)), fn(*a))[1]

    def mlp_counted(h, x, mlp, nt, real=cpu_step_mod.mlp_step):  # a dense layer's one-call MLP: 3 weights
        return (calls.extend([x.shape[0]] * (3 if mlp[0].dtype == np.int8 else 0)), real(h, x, mlp, nt))[1]

    with pytest.MonkeyPatch.context() as mp:
        for name, n in (("int8_gemv", 1), ("gemv_pair", 2), ("swiglu_gemv", 3), ("int8_gemv_tiles", 1)):
            mp.setattr(linear_mod, name, counted(getattr(linear_mod, name), n))
        mp.setattr(linear_mod, "swiglu_out", lambda x, mlp, nt, real=linear_mod.swiglu_out:  # over tiles: 3 weights
                   (calls.extend([x.shape[0]] * 3), real(x, mlp, nt))[1])
        mp.setattr(cpu_step_mod, "mlp_step", mlp_counted)
        cache = q.new_cache(32)
        rows = [q.forward(ids[:20], cache)] + [q.forward(ids[i:i + 1], cache) for i in range(20, 27)]
    full = q.forward(ids, q.new_cache(32))
    assert float((torch.cat(rows) - full).abs().max()) <= 1e-4 * float(full.abs().max())
    n_int8 = sum(isinstance(w, tuple) for w in qw.values())
    assert len(calls) == 7 * n_int8 and set(calls) == {1}  # every int8 linear of every step, never the prefill


def test_prefill_in_chunks_gives_the_same_logits_and_cache(tiny_path):
    """A prompt prefilled prefill_chunk tokens per forward (each chunk attending to what the earlier
    ones cached) against one forward over it all: same logits at every generated step, same KV rows.
    Chunks of 5 leave a last chunk of 2; chunks of 36 leave one token (the decode path)."""
    prompt = list(range(3, 40))  # 37 tokens
    runs = {}
    for chunk in (None, 5, 36):
        eng = hybrid.load(tiny_path, backend="reference", device="cpu", context=64)
        eng.prefill_chunk = chunk
        seen, sizes, forward = [], [], eng.model.forward
        eng.model.forward = lambda ids, cache, **kw: (sizes.append(len(ids)), forward(ids, cache, **kw))[1]
        steps = list(eng.generate(prompt, 4, sampler=lambda lg: (seen.append(lg.clone()), 7)[1]))
        assert steps[0].prefill_tokens == len(prompt)
        assert sizes == {None: [37], 5: [5] * 7 + [2], 36: [36, 1]}[chunk] + [1, 1, 1]
        c = eng._cache
        runs[chunk] = (seen, torch.stack([torch.cat(c.rows(i, c.length), -1) for i in range(c.layers)]))
        eng.close()
    base, kv = runs[None]
    for chunk in (5, 36):
        got, got_kv = runs[chunk]
        # the pages are bf16: fp32 rows equal to ~1e-6 may round one bf16 step (2^-8 relative) apart
        assert got_kv.shape == kv.shape and torch.allclose(got_kv, kv, rtol=2 ** -7, atol=1e-6)
        for a, b in zip(got, base):
            assert float((a - b).abs().max() / b.abs().max()) < 1e-5
    with pytest.raises(ValueError, match="prefill_chunk must be an integer >= 1"):
        hybrid.load(tiny_path, prefill_chunk=0)
    # counts of the wrong type are the same one-line error, not a TypeError from deep inside
    for name, value, low in (("context", "4096", 1), ("context", 0, 1), ("hot_experts", True, 0),
                             ("hot_experts", 1.5, 0), ("defer_experts", "1", 0), ("defer_experts", -1, 0)):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= {low}, got {value!r}"):
            hybrid.load(tiny_path, **{name: value})


def test_stopping_between_prefill_chunks_keeps_what_was_prefilled(tiny_path):
    """should_stop is asked before every chunk after the first; stopping yields nothing, and the next
    request with the same prompt reuses the chunks already in the cache."""
    eng = hybrid.load(tiny_path, backend="reference", device="cpu", context=64)
    eng.prefill_chunk = 5
    prompt = list(range(3, 40))  # 37 tokens: 8 chunks
    asked = []
    steps = list(eng.generate(prompt, 4, should_stop=lambda: (asked.append(1), len(asked) >= 3)[1]))
    assert steps == [] and len(asked) == 3 and eng._cache.length == 15  # chunks 1-3 ran, the 4th was refused
    again = list(eng.generate(prompt, 2, sampler=lambda lg: 7))
    assert again[0].prefill_tokens == len(prompt) - 15
    fresh = hybrid.load(tiny_path, backend="reference", device="cpu", context=64)
    want = []
    list(fresh.generate(prompt, 2, sampler=lambda lg: (want.append(lg.clone()), 7)[1]))
    got = []
    again = hybrid.load(tiny_path, backend="reference", device="cpu", context=64)
    again.prefill_chunk = 5
    asked.clear()
    assert list(again.generate(prompt, 4, should_stop=lambda: (asked.append(1), len(asked) >= 3)[1])) == []
    steps = list(again.generate(prompt, 2, sampler=lambda lg: (got.append(lg.clone()), 7)[1]))
    assert steps[0].prefill_tokens == len(prompt) - 15  # the 15 prefilled before the stop were kept
    again.close()
    for a, b in zip(got, want):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5
    eng.close()
    fresh.close()


def test_bf16_gpu_side_runs_every_attention_form_and_tracks_fp32(tiny_path, monkeypatch):
    """On CUDA the engine keeps the GPU side in bf16; here the same code in bf16 on the CPU (tiny
    shapes, so its slow bf16 matmuls do not matter): naive, chunked and absorbed attention and the
    static decode step all run and track the fp32 engine. Per position the logits stay within bf16
    rounding (2-3% of the largest), except where bf16 tips a router near a tie to another expert: that
    changes a position's output by more, so the check is on the typical position and the top token."""
    import statistics

    import hybrid.model.k2 as model
    from hybrid.checkpoint.reader import Checkpoint
    from hybrid.runtime.decode_step import StaticDecoder
    from hybrid.runtime.engine import Engine
    from hybrid.experts.reference import ReferenceExperts

    ckpt = Checkpoint(tiny_path)
    f32 = Engine(ckpt, ReferenceExperts(ckpt), dtype=torch.float32, context=64)
    b16 = Engine(ckpt, ReferenceExperts(ckpt), dtype=torch.bfloat16, context=64)
    assert b16.model.w["model.norm.weight"].dtype == torch.bfloat16
    ids = torch.randint(0, f32.config.vocab_size, (24,), generator=torch.Generator().manual_seed(4))

    def tracks(got, want):  # rows of logits [T, V]
        errs = [float((g.float() - w).abs().max() / w.abs().max()) for g, w in zip(got, want)]
        same_top = sum(int(g.argmax()) == int(w.argmax()) for g, w in zip(got, want)) / len(errs)
        return statistics.median(errs) < 3e-2 and max(errs) < 0.5 and same_top >= 0.9

    want = f32.logits(ids)
    for attn in ("naive", "absorbed"):
        assert tracks(b16.logits(ids, attn=attn), f32.logits(ids, attn=attn))
    monkeypatch.setattr(model, "CHUNKED_MIN_SCORES", 100)
    assert tracks(b16.logits(ids, attn="naive"), want)
    monkeypatch.undo()
    # prefill 16, then 8 decode steps: the plain forward and the static step, both in bf16
    plain, static = b16.model.new_cache(64), b16.model.new_cache(64)
    assert plain.kv.dtype == torch.bfloat16
    b16.model.forward(ids[:16], plain)
    b16.model.forward(ids[:16], static)
    dec = StaticDecoder(b16.model, static, bucket_min=16)
    steps_plain, steps_static = [], []
    for t in range(16, 24):
        steps_plain.append(b16.model.forward(ids[t:t + 1], plain)[-1])
        steps_static.append(dec.step(int(ids[t]))[-1])
    assert all(x.dtype == torch.float32 for x in steps_plain + steps_static)
    assert tracks(steps_plain, want[16:]) and tracks(steps_static, want[16:])
    f32.close()
    b16.close()


def test_engine_holds_the_gpu_side_as_the_plan_counts_it(tiny_path):
    """The engine's weights, bf16 and int8, against placement's accounting: same bytes on the device
    for every GPU-side class, the embedding in host RAM, the router's bias exactly as stored (F32)."""
    import numpy as np

    from hybrid.checkpoint.reader import Checkpoint
    from hybrid.runtime.engine import Engine
    from hybrid.runtime.tensor_classes import GPU_SIDE, class_sizes
    from hybrid.experts.reference import ReferenceExperts

    ckpt = Checkpoint(tiny_path)
    sizes = class_sizes(ckpt.config)
    for int8, precision in ((False, "bf16"), (True, "int8")):
        e = Engine(ckpt, ReferenceExperts(ckpt), dtype=torch.bfloat16, context=16, int8=int8)
        w = e.model.w
        held = sum(sum(t.numel() * t.element_size() for t in (v if isinstance(v, tuple) else (v,)))
                   for k, v in w.items() if k != "model.embed_tokens.weight")
        side = {c: precision if precision != "int8" or c in ("attention", "shared_experts", "dense_mlp", "lm_head")
                else "bf16" for c in GPU_SIDE}
        assert held == sum(sizes.nbytes(c, side[c]) for c in GPU_SIDE)
        assert isinstance(w["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"], tuple) == int8
        assert not isinstance(w["model.layers.1.self_attn.kv_b_proj.weight"], tuple)
        emb = w["model.embed_tokens.weight"]
        assert emb.dtype == torch.bfloat16 and emb.shape == (e.config.vocab_size, e.config.hidden_size)
        bias = w["model.layers.1.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32
        assert np.array_equal(bias.numpy(), ckpt.array("model.layers.1.mlp.gate.e_score_correction_bias"))
        e.close()


def test_bf16_weights_under_fp32_math_equal_fp32_weights(tiny_path):
    """The CPU's GPU side keeps its linear and router weights in bf16 as stored and widens them in
    each product (bf16w): prefill (the GEMM over widened blocks) and decode (the Numba GEMV) give the
    logits of the same weights held in fp32, to summation order (kv_b_proj too, read by the CPU's
    per-head products of absorbed decode and widened for prompt attention); the norms stay fp32."""
    from hybrid.checkpoint.reader import Checkpoint
    from hybrid.runtime.engine import Engine
    from hybrid.experts.reference import ReferenceExperts

    ckpt = Checkpoint(tiny_path)
    engines = [Engine(ckpt, ReferenceExperts(ckpt), context=64, bf16w=b) for b in (True, False)]
    w16, w32 = (e.model.w for e in engines)
    assert w16["model.layers.1.self_attn.q_b_proj.weight"].dtype == torch.bfloat16
    assert w16["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert w16["lm_head.weight"].dtype == torch.bfloat16
    assert w16["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
    assert w16["model.norm.weight"].dtype == torch.float32
    assert all(v.dtype == torch.float32 for k, v in w32.items() if k != "model.embed_tokens.weight")
    held = [sum(v.numel() * v.element_size() for k, v in w.items()) for w in (w16, w32)]
    halved = [k for k, v in w16.items() if v.dtype == torch.bfloat16 and k != "model.embed_tokens.weight"]
    assert len(halved) == sum(k.endswith(("proj.weight", "mqa.weight", "gate.weight", "lm_head.weight")) for k in w16)
    assert held[1] - held[0] == sum(2 * w16[k].numel() for k in halved)
    ids = torch.arange(5, 25)
    outs = []
    for e in engines:
        cache = e.model.new_cache(64)
        rows = [e.model.forward(ids, cache)]  # 20 rows: the GEMM path
        rows += [e.model.forward(torch.tensor([t]), cache) for t in (7, 300, 9)]  # one row: the GEMV
        outs.append(torch.cat(rows))
    scale = float(outs[1].abs().max())
    assert float((outs[0] - outs[1]).abs().max()) <= 1e-5 * scale
    for e in engines:
        e.close()


@pytest.mark.parametrize("dtype, precision", [("auto", "auto"), ("float32", "auto"), ("bfloat16", "auto"),
                                              ("auto", "int8")])
def test_loaded_engine_matches_its_plan(tiny_path, dtype, precision):
    """hybrid.load's plan and what the engine then holds agree, for each dtype of a CPU-side engine
    (and int8 weights asked for): the GPU-side weights' bytes, the KV cache's bytes, and the
    embedding in host RAM as stored."""
    from hybrid.runtime.placement import GPU_SIDE

    e = hybrid.load(tiny_path, backend="reference", device="cpu", context=32, dtype=dtype, gpu_precision=precision)
    want = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    assert e.model.dtype == want and e._kv.pages.main.data.dtype == torch.bfloat16  # KV pages: bf16 on every device
    assert e.plan.gpu_precision == ("bf16" if dtype == "bfloat16" else "int8w" if precision == "int8" else "bf16w")
    o_proj, router = e.model.w["model.layers.1.self_attn.o_proj.weight"], e.model.w["model.layers.1.mlp.gate.weight"]
    if precision == "int8":
        assert o_proj[0].dtype == torch.int8 and o_proj[1].dtype == torch.bfloat16 and router.dtype == torch.bfloat16
    else:
        assert o_proj.dtype == torch.bfloat16  # as stored, either way
    held = sum(sum(t.numel() * t.element_size() for t in (v if isinstance(v, tuple) else (v,)))
               for k, v in e.model.w.items() if k != "model.embed_tokens.weight")
    entries = {x.what: x for x in e.plan.entries}
    assert held == sum(entries[w].nbytes for w in GPU_SIDE)
    assert e._kv.pages.main.nbytes == entries["kv_cache"].nbytes and e._kv.pages.spill is None
    emb = e.model.w["model.embed_tokens.weight"]
    assert emb.device.type == "cpu" and emb.dtype == torch.bfloat16  # as stored, whatever the compute dtype
    assert entries["embedding"].nbytes == emb.numel() * 2
    e.close()


def test_float32_is_refused_on_cuda_by_the_plan():
    from hybrid.checkpoint.config import ModelConfig
    from hybrid.runtime.hardware import Hardware
    from hybrid.runtime.placement import plan

    from tests.conftest import REAL_CONFIG

    with pytest.raises(ValueError, match="dtype 'float32'"):
        plan(ModelConfig.from_file(REAL_CONFIG), Hardware.hypothetical(128, [24], cores=16), dtype="float32")
