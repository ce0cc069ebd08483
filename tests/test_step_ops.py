"""kernels_cpu/step_ops.py, a CPU decode step's RMSNorm and router choice, against torch's forms; the one-call
attention block and MLP half (attn_step.py, moe_step.py) against the separate steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid.checkpoint.config import ModelConfig
from hybrid.model.k2 import Model
from kernels_cpu import mla_amx, step_ops
from kernels_cpu.simd import host_has_avx2


def test_rms_norm_matches_the_float64_form():
    rng = np.random.default_rng(3)
    for T, D in ((1, 7168), (3, 1536), (8, 512), (2, 37)):
        x = (rng.standard_normal((T, D)) * rng.uniform(0.01, 30, (T, 1))).astype(np.float32)
        w = rng.uniform(0.5, 2, D).astype(np.float32)
        x64 = x.astype(np.float64)
        ref = w * x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(step_ops.rms_norm(x, w, 1e-6), ref, rtol=2e-6, atol=1e-6)
    assert np.isnan(step_ops.rms_norm(np.full((1, 8), np.nan, np.float32), np.ones(8, np.float32), 1e-6)).all()
    with pytest.raises(ValueError, match="T <= 8"):
        step_ops.rms_norm(np.zeros((9, 4), np.float32), np.ones(4, np.float32), 1e-6)
    with pytest.raises(ValueError, match="w float32"):
        step_ops.rms_norm(np.zeros((1, 4), np.float32), np.ones(5, np.float32), 1e-6)


def _torch_route(logits, bias, k, norm, factor):
    scores = torch.sigmoid(torch.from_numpy(logits))
    ids = (scores + torch.from_numpy(bias)).topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids.numpy(), (weights * factor).numpy()


@pytest.mark.parametrize("norm", [True, False])
def test_route_chooses_and_weighs_as_torch_does(norm):
    """K2's router shape (384 experts, 8 a token) and a small one; the bias moves the choice."""
    rng = np.random.default_rng(4)
    for T, E, k in ((1, 384, 8), (8, 384, 8), (3, 16, 16), (2, 48, 1)):
        logits = (rng.standard_normal((T, E)) * 3).astype(np.float32)
        bias = (rng.standard_normal(E) * 0.5).astype(np.float32)
        ids, w = step_ops.route(logits, bias, k, norm, 2.827)
        rid, rw = _torch_route(logits, bias, k, norm, 2.827)
        np.testing.assert_array_equal(ids, rid)  # in the same order: largest choice first
        np.testing.assert_allclose(w, rw, rtol=1e-6)
        assert not (set(ids[0]) == set(np.argsort(-logits[0])[:k]) and E > k)  # the bias changed the choice
    with pytest.raises(ValueError, match="1 <= k <= E"):
        step_ops.route(logits, bias, E + 1, norm, 1.0)


@pytest.mark.parametrize("kind", ["bf16", "int8", "tiles", "mixed"])
def test_attention_step_equals_the_separate_kernels(kind):
    """kernels_cpu.attn_step.attention_step, a decode step's attention block in one call, returns what the
    separate public kernels give in the same order (RMSNorm, gemv_pair over q_a and kv_a, RMSNorm, q_b,
    mla_decode writing the new rows, o_proj, the residual, RMSNorm), bit for bit, and writes the same
    pages: bf16 weights or int8 codes with bf16 row scales (input widths that are whole int8 blocks and
    one that is not), q_a and kv_a as int8tiles' tiles (both, or q_a alone beside row-major kv_a), 1-3 tokens,
    a page in the host tier. Its cycle stamps rise."""
    from kernels_cpu.attn_step import PARTS, attention_step
    from kernels_cpu.int8tiles import int8_gemv_tiles, tile_rows
    from kernels_cpu.mla import mla_decode
    from kernels_cpu.widen import bf16_gemv, gemv_pair, int8_gemv

    if kind in ("tiles", "mixed") and not host_has_avx2():
        pytest.skip("the tile kernel is AVX2 code")
    rng = np.random.default_rng(3)
    H, P, R, L, V, PG, D, Q = 8, 16, 8, 64, 16, 4, 256, 96  # Q: not a whole int8 block (128)
    if kind in ("tiles", "mixed"):
        D = 512  # whole tiles of columns for q_a and kv_a

    def bits(a):
        return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)

    def weight(o, i):
        w = rng.standard_normal((o, i)) / np.sqrt(i)
        if kind == "bf16":
            return bits(w), np.empty(0, np.uint16)
        return rng.integers(-127, 128, (o, i), dtype=np.int8), bits(rng.uniform(0.5, 1.5, o) / 127 / np.sqrt(i))

    def linear(x, w, s):
        return bf16_gemv(x, w) if kind == "bf16" else int8_gemv_tiles(x, w, s) if w.ndim == 4 else int8_gemv(x, w, s)

    norms = tuple(rng.uniform(0.5, 1.5, n).astype(np.float32) for n in (D, Q, L, D))
    eps = (np.float32(1e-5), np.float32(1e-6))
    (wa, sa), (wk, sk), (wb, sb), (wo, so) = weight(Q, D), weight(L + R, D), weight(H * (P + R), Q), weight(D, H * V)
    if kind in ("tiles", "mixed"):
        wa = tile_rows(wa)
        wk = tile_rows(wk) if kind == "tiles" else wk
    kvb = bits(rng.standard_normal((H, P + V, L)) / 4)
    for T, s0 in ((1, 6), (3, 9), (2, 0)):
        main, spill = bits(rng.standard_normal((6, PG, L + R))), bits(rng.standard_normal((2, PG, L + R)))
        table = np.array([4, -2, 0, 5, 1], np.int32)  # the second page in the host tier
        h = rng.standard_normal((T, D)).astype(np.float32)
        ang = rng.uniform(0, 6, (T, R // 2)).astype(np.float32)
        cos, sin = np.cos(ang), np.sin(ang)
        pools = (main.copy(), spill.copy())
        x = step_ops.rms_norm(h, norms[0], eps[0])
        qa, kv = (linear(x, wa, sa), linear(x, wk, sk)) if wa.ndim == 4 else gemv_pair(x, wa, sa, wk, sk)
        q = linear(step_ops.rms_norm(qa, norms[1], eps[1]), wb, sb).reshape(T, H, P + R)
        o = mla_decode(q, cos, sin, kvb, *pools, table, s0, 0.3, 2, kv, norms[2], eps[1])
        h_want = h + linear(o.reshape(T, H * V), wo, so)
        x_want = step_ops.rms_norm(h_want, norms[3], eps[0])
        clock = np.zeros(PARTS, np.int64)
        h_got, x_got = attention_step(h, norms, eps, (wa, sa, wk, sk, wb, sb, wo, so), kvb, main, spill, table, s0,
                                      cos, sin, np.float32(0.3), 2, 2, mla_amx.usable(main), clock)
        np.testing.assert_array_equal(h_got, h_want)
        np.testing.assert_array_equal(x_got, x_want)
        assert (main == pools[0]).all() and (spill == pools[1]).all()  # the same new rows, in the same pages
        assert (np.diff(clock) >= 0).all() and clock[-1] > clock[0]


@pytest.mark.parametrize("precision", ["auto", "int8", "int8 tiles"])
def test_one_call_decode_steps_equal_the_separate_steps(tiny_path, make_checkpoint, monkeypatch, precision):
    """A CPU decode step with every layer in one Numba call (model/cpu_step.py's layers, kernels_cpu.token_step), or
    one call a layer (LAYERS_PER_CALL 1), and layer by layer with the MLP half in one call (cpu_step's moe and dense,
    kernels_cpu.moe_step), give the logits of the separate steps (the router, the backend's submit and wait, the shared
    expert, the sums, Model.head) bit for bit, with bf16 and with int8 non-expert weights (row-major, and on a model
    whose hidden size takes int8tiles' tiles: q_a, kv_a, the MLPs' gate and up and lm_head held as tiles, beside
    row-major q_b, o_proj and down); every decode step goes through the path on trial (the one call with the final norm
    and lm_head in it); and the backend counts those calls as its own (expert bytes, routing counts)."""
    import hybrid
    from hybrid.model import cpu_step

    if precision == "int8 tiles" and not host_has_avx2():
        pytest.skip("int8 tiles are held only where the CPU runs their kernel (AVX2)")
    path = make_checkpoint(hidden_size=512) if precision == "int8 tiles" else tiny_path

    def run() -> tuple[list[int], list[torch.Tensor], dict, dict]:
        logits: list[torch.Tensor] = []
        eng = hybrid.load(path, device="cpu", context=128, gpu_precision=precision.split()[0])
        if precision == "int8 tiles":
            w = eng.model.weights
            assert w.layers[0].self_attn.q_a_proj[0].dim() == w.lm_head[0].dim() == 4
            assert w.layers[0].self_attn.o_proj[0].dim() == 2
        toks = [s.token for s in eng.generate(list(range(20, 60)), 12,
                                              sampler=lambda lg: (logits.append(lg.clone()), int(lg.argmax()))[1])]
        stats, counts = eng.stats(), {i: c.copy() for i, c in eng.model.experts.route_counts.items()}
        eng.close()
        return toks, logits, stats, counts

    taken: dict[str, list[bool]] = {"layers": [], "moe": [], "dense": []}
    heads: list[int] = []  # Model.head's calls: the one call runs the final norm and lm_head itself
    monkeypatch.setattr(Model, "head", lambda self, h, real=Model.head: (heads.append(1), real(self, h))[1])
    for name, seen in taken.items():
        real = getattr(cpu_step, name)
        monkeypatch.setattr(cpu_step, name, lambda *a, real=real, seen=seen:
                            (lambda v: (seen.append(v is not None), v)[1])(real(*a)))
    c = ModelConfig.from_file(path)
    n_moe = len(c.moe_layers)
    runs = []
    for off in ((), "one layer a call", ("layers",), ("layers", "moe", "dense")):
        if off == "one layer a call":  # several decode_layers calls: dense ones, MoE ones, dummies for the other
            monkeypatch.setattr(cpu_step, "LAYERS_PER_CALL", 1)
            off = ()
        for name in off:
            monkeypatch.setattr(cpu_step, name, lambda *a: None)
        for seen in taken.values():
            seen.clear()
        heads.clear()
        runs.append(run())
        steps = len(runs[-1][1]) - 1  # decode steps: the prompt is one forward
        assert steps >= 8
        assert len(heads) == (1 if not off else steps + 1)  # the prompt's forward, or every forward
        if not off:
            assert taken["layers"].count(True) == steps and taken["moe"].count(True) == 0
        elif off == ("layers",):
            assert taken["moe"].count(True) == steps * n_moe
            assert taken["dense"].count(True) == steps * (c.num_hidden_layers - n_moe) > 0
    (toks, logits, stats, counts), *others = runs
    for toks_o, logits_o, stats_o, counts_o in others:
        assert toks_o == toks and len(logits_o) == len(logits)
        assert all(torch.equal(a, b) for a, b in zip(logits, logits_o))
        assert stats["expert_bytes"] == stats_o["expert_bytes"] > 0 and stats["experts_compute_s"] > 0
        assert counts.keys() == counts_o.keys() and all((counts[i] == counts_o[i]).all() for i in counts)
    assert stats["attention_s"] > stats["attention_proj_s"] > 0 and stats["router_s"] > 0 and stats["dense_s"] > 0
