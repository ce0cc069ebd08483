"""kernels_gpu against slow, obviously-correct references, on whatever device is present.

MLA: a full-softmax naive attention in float64 (keys and values expanded per head, a [T, H, S] score
matrix). int8: an analytic error bound. Offload: hand-computed thresholds and byte equality of
uploads. Graphs and host functions: eager == graph. Contract: hybrid.model.k2's attention (both forms)
rebuilt through these kernels on a tiny checkpoint. INT4 and the hot experts: test_int4_gpu.py.
CUDA-only tests are marked; everything else runs on the CPU in a few seconds (small shapes).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hybrid.runtime.graphs import GraphCache, GraphedStep
from kernels_gpu.int8 import int8_linear, pick_kernel, quantize_int8
from kernels_gpu.mla import absorb_query, chunked_prefill_attention, mla_decode, prefill_attention
from hybrid.experts.upload import (LayerUploader, PrefillSpeeds, expert_flops_per_token, measure_pcie_gbps,
                                 offload_threshold, prefill_on_gpu)

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
H, P, R, L, V = 4, 16, 8, 32, 16  # heads, nope, rope, latent, value
SCALE = 0.19
ROOT = Path(__file__).resolve().parents[1]


# ---- MLA ------------------------------------------------------------------------------------

def mla_inputs(T: int, S: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"q_nope": (T, H, P), "q_pe": (T, H, R), "kv": (S, L), "k_pe": (S, R), "w_uk": (H, P, L), "w_uv": (H, V, L)}
    return {k: (torch.randn(*s, generator=g) * 0.5).to(DEV, dtype) for k, s in t.items()}


def ref_attention(q_nope, q_pe, kv, k_pe, w_uk, w_uv, scale, offset):
    """Naive MLA in float64: expand K and V per head, full [T, H, S] scores, causal mask, softmax."""
    q_nope, q_pe, kv, k_pe, w_uk, w_uv = (t.double().cpu() for t in (q_nope, q_pe, kv, k_pe, w_uk, w_uv))
    T, S = q_nope.shape[0], kv.shape[0]
    k_nope = torch.einsum("sl,hpl->shp", kv, w_uk)
    v = torch.einsum("sl,hvl->shv", kv, w_uv)
    scores = (torch.einsum("thp,shp->ths", q_nope, k_nope) + torch.einsum("thr,sr->ths", q_pe, k_pe)) * scale
    future = torch.arange(S)[None, :] > (offset + torch.arange(T))[:, None]  # [T, S]
    p = torch.softmax(scores.masked_fill(future[:, None, :], float("-inf")), dim=-1)
    return torch.einsum("ths,shv->thv", p, v)


def close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("T,offset,pad", [(1, 0, 0), (1, 40, 0), (1, 40, 9), (3, 37, 0), (3, 37, 5)])
@pytest.mark.parametrize("block", [None, 7, 64])
def test_mla_decode_matches_naive_reference(T, offset, pad, block):
    # pad: the cache slice is longer than offset + T (a length bucket); those rows must be masked
    x = mla_inputs(T, offset + T + pad)
    out = mla_decode(x["q_nope"], x["q_pe"], x["kv"], x["k_pe"], x["w_uk"], x["w_uv"], SCALE, offset, block=block)
    assert out.shape == (T, H, V) and out.device.type == DEV.type
    close(out, ref_attention(**x, scale=SCALE, offset=offset))


@pytest.mark.parametrize("block", [None, 16])
def test_mla_decode_device_offset_and_absorbed_query(block):
    T, offset, pad = 2, 30, 12
    x = mla_inputs(T, offset + T + pad, seed=1)
    ref = ref_attention(**x, scale=SCALE, offset=offset)
    pos = torch.tensor(offset, device=DEV)  # length on the device, as a captured graph holds it
    close(mla_decode(x["q_nope"], x["q_pe"], x["kv"], x["k_pe"], x["w_uk"], x["w_uv"], SCALE, pos, block=block), ref)
    q_lat = absorb_query(x["q_nope"], x["w_uk"])
    close(mla_decode(q_lat, x["q_pe"], x["kv"], x["k_pe"], None, x["w_uv"], SCALE, offset, absorbed=True,
                     block=block), ref)


@pytest.mark.parametrize("offset", [0, 23])
@pytest.mark.parametrize("q_chunk,k_block", [(1024, 4096), (5, 4096), (7, 16), (64, 9), (3, 1)])
def test_chunked_prefill_matches_full_softmax(offset, q_chunk, k_block):
    # (.., 4096): one key block -> scaled_dot_product_attention per query chunk; small k_block -> online softmax
    T = 37
    x = mla_inputs(T, offset + T, seed=2)
    out = chunked_prefill_attention(x["q_nope"], x["q_pe"], x["kv"], x["k_pe"], x["w_uk"], x["w_uv"], SCALE, offset,
                                    q_chunk=q_chunk, k_block=k_block)
    assert out.shape == (T, H, V)
    close(out, ref_attention(**x, scale=SCALE, offset=offset))


@pytest.mark.parametrize("T,offset", [(1, 0), (37, 0), (37, 23), (64, 5)])
@pytest.mark.parametrize("q_block", [1, 8, 64])
def test_causal_block_prefill_matches_full_softmax(T, offset, q_block):
    # keys and values expanded as the model does (strided [H, S, *] views of one [S, H, P+V] tensor),
    # two extra cache rows past the prompt that no query may see
    x = mla_inputs(T, offset + T + 2, seed=5)
    kvb = torch.cat((torch.einsum("sl,hpl->shp", x["kv"], x["w_uk"]), torch.einsum("sl,hvl->shv", x["kv"], x["w_uv"])),
                    dim=-1).transpose(0, 1)  # [H, S, P+V]
    out = prefill_attention(x["q_nope"], x["q_pe"], kvb[..., :P], kvb[..., P:], x["k_pe"], SCALE, offset,
                            q_block=q_block)
    assert out.shape == (T, H, V) and out.dtype == x["q_nope"].dtype
    close(out, ref_attention(**{**x, "kv": x["kv"][:offset + T], "k_pe": x["k_pe"][:offset + T]}, scale=SCALE,
                             offset=offset))


def test_prefill_then_decode_agree_on_the_same_positions():
    # the last prompt token attended by prefill == the same token decoded (absorbed == naive)
    x = mla_inputs(20, 20, seed=3)
    pre = chunked_prefill_attention(x["q_nope"], x["q_pe"], x["kv"], x["k_pe"], x["w_uk"], x["w_uv"], SCALE, 0,
                                    q_chunk=8, k_block=6)
    dec = mla_decode(x["q_nope"][-1:], x["q_pe"][-1:], x["kv"], x["k_pe"], x["w_uk"], x["w_uv"], SCALE, 19)
    close(dec[0], pre[-1])


def test_mla_bf16_close_to_fp32():
    x = mla_inputs(2, 50, seed=4, dtype=torch.bfloat16)
    ref = ref_attention(**x, scale=SCALE, offset=48)
    close(mla_decode(x["q_nope"], x["q_pe"], x["kv"], x["k_pe"], x["w_uk"], x["w_uv"], SCALE, 48, block=16), ref, 5e-2)
    close(chunked_prefill_attention(x["q_nope"], x["q_pe"], x["kv"], x["k_pe"], x["w_uk"], x["w_uv"], SCALE, 48,
                                    k_block=16), ref, 5e-2)
    close(chunked_prefill_attention(x["q_nope"], x["q_pe"], x["kv"], x["k_pe"], x["w_uk"], x["w_uv"], SCALE, 48,
                                    q_chunk=1), ref, 5e-2)  # one key block: prefill_attention in bf16


# ---- int8 -------------------------------------------------------------------------------------

def test_int8_quantise_and_error_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(33, 80, generator=g) * torch.logspace(-3, 1, 33)[:, None]  # rows of very different size
    w[5] = 0.0
    q, scale = quantize_int8(w.to(DEV))
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (33,)
    assert int(q.abs().max()) <= 127 and int(q[5].abs().max()) == 0
    err = (q.float() * scale.float()[:, None]).cpu() - w
    assert bool((err.abs() <= scale.float().cpu()[:, None] / 2 * (1 + 1e-6)).all())
    x = torch.randn(2, 3, 80, generator=g)
    exact = x.double() @ w.double().T
    bound = 0.5 * x.double().abs() @ scale.double().cpu()[None, :].expand(80, -1) + 1e-5 * exact.abs() + 1e-6
    for kernel, block in ((None, 8192), ("plain", 8192), ("plain", 10)):  # aten's kernel where it runs; the
        y = int8_linear(x.to(DEV), q, scale, kernel=kernel, block_rows=block).cpu()  # plain path, whole and in blocks
        assert y.shape == (2, 3, 33) and bool(((y.double() - exact).abs() <= bound).all())
        torch.testing.assert_close(y, x @ (q.float() * scale.float()[:, None]).cpu().T, rtol=1e-5, atol=1e-5)


def test_int8_triton_gemv_equals_the_dequantising_path():
    """kernels_gpu.int8_triton over shapes past one program's block both ways (O 70: 3 row blocks, the
    last partial; I 300: 2.3 reduction steps), 1 to 4 rows, fp32 and bf16 x (bf16 as on the GPU; the
    reference then computes in fp32 from the same bf16 inputs and rounds once)."""
    pytest.importorskip("triton", reason="Triton is in [dev] on x86-64 Linux only")
    from kernels_gpu.int8_triton import BLOCK_COLS, BLOCK_ROWS, MAX_TOKENS, int8_gemv

    O, I = BLOCK_ROWS * 2 + 6, BLOCK_COLS * 2 + 44
    g = torch.Generator().manual_seed(3)
    q, scale = quantize_int8(torch.randn(O, I, generator=g) * torch.logspace(-2, 0, O)[:, None])
    q[0, :] = 127  # both code extremes reach the kernel
    q[1, :] = -127
    ref_w = q.double() * scale.double()[:, None]
    for T in range(1, MAX_TOKENS + 1):
        x = torch.randn(T, I, generator=g)
        y = int8_linear(x.to(DEV), q.to(DEV), scale.to(DEV), kernel="triton").cpu()
        assert y.dtype == torch.float32 and y.shape == (T, O)
        torch.testing.assert_close(y.double(), x.double() @ ref_w.T, rtol=1e-5, atol=1e-5)
        xb = x.to(torch.bfloat16)
        yb = int8_gemv(xb.to(DEV), q.to(DEV), scale.to(DEV)).cpu()
        assert yb.dtype == torch.bfloat16
        # one rounding to bf16: to nearest on a GPU; Triton's interpreter truncates, so twice the error
        torch.testing.assert_close(yb.double(), xb.double() @ ref_w.T, rtol=2 ** (-8 if CUDA else -7), atol=1e-6)
    x3 = torch.randn(1, 1, I, generator=g)  # leading dims of x are kept
    assert int8_linear(x3.to(DEV), q.to(DEV), scale.to(DEV), kernel="triton").shape == (1, 1, O)
    with pytest.raises(ValueError, match="T <= 4"):
        int8_gemv(torch.randn(MAX_TOKENS + 1, I).to(DEV), q.to(DEV), scale.to(DEV))
    with pytest.raises(ValueError, match="scale bf16"):
        int8_gemv(torch.randn(1, I).to(DEV), q.to(DEV), scale.float().to(DEV))
    with pytest.raises(ValueError, match="kernel must be one of aten, triton, plain"):
        int8_linear(x3, q, scale, kernel="fast")
    # the default: the GEMV for a CUDA decode step (one row), the dequantising path for more rows
    assert pick_kernel("cuda", torch.bfloat16, 1) == "triton"
    assert pick_kernel("cuda", torch.bfloat16, 2) == pick_kernel("cuda", torch.bfloat16, 512) == "plain"


def test_a_triton_gemv_that_fails_falls_back_to_dequantising_once(monkeypatch, caplog):
    """A GPU or toolchain Triton cannot target must not break an int8 plan: the first failure is
    logged, that call and every later one on the device take the dequantising path."""
    pytest.importorskip("triton", reason="Triton is in [dev] on x86-64 Linux only")
    import kernels_gpu.int8 as int8_mod
    import kernels_gpu.int8_triton as int8_triton

    calls = []

    def broken(x, q, scale):
        calls.append(1)
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(int8_mod, "_TRITON_WORKS", {})
    monkeypatch.setattr(int8_mod, "pick_kernel", lambda dev, dt, rows: "triton" if rows == 1 else "plain")
    monkeypatch.setattr(int8_triton, "int8_gemv", broken)
    g = torch.Generator().manual_seed(4)
    q, scale = quantize_int8(torch.randn(40, 64, generator=g))
    x = torch.randn(1, 64, generator=g)
    want = int8_linear(x, q, scale, kernel="plain")
    with caplog.at_level("WARNING", logger="kernels_gpu.int8"):
        assert torch.equal(int8_linear(x, q, scale), want) and torch.equal(int8_linear(x, q, scale), want)
    assert len(calls) == 1 and "int8 linears dequantise from now on" in caplog.text
    with pytest.raises(RuntimeError, match="no kernel image"):
        int8_linear(x, q, scale, kernel="triton")  # asked for by name: the error is the caller's
    assert pick_kernel("mps", torch.float16, 1) == pick_kernel("xpu", torch.bfloat16, 1) == "plain"


def test_router_logits_in_fp32_without_widening_the_weight():
    """hybrid.model.linear.fp32_linear: DeepSeek-V3's fp32 router product from bf16 operands. On CUDA it
    runs torch.mm(out_dtype=float32) (where this torch has it) and must equal the widened product to
    fp32 accuracy; on a CPU, fp32 activations over the bf16 weight (the engine's bf16w) go through
    the widening GEMV (3 rows) and GEMM (12 rows). Router logits of K2's shape."""
    from hybrid.model.linear import fp32_linear

    g = torch.Generator().manual_seed(9)
    x = (torch.randn(3, 7168, generator=g) * 2).to(torch.bfloat16)
    w = (torch.randn(384, 7168, generator=g) * 0.02).to(torch.bfloat16)
    exact = x.double() @ w.double().T
    y = fp32_linear(x.to(DEV), w.to(DEV))
    assert y.dtype == torch.float32 and y.shape == (3, 384)
    torch.testing.assert_close(y.double().cpu(), exact, rtol=1e-5, atol=1e-5)
    x32 = x.float()
    torch.testing.assert_close(fp32_linear(x32, w.float()).double(), exact, rtol=1e-5, atol=1e-5)
    import hybrid.model.linear as lin

    calls = []
    widen = lin.widening_linear
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lin, "widening_linear", lambda a, b: (calls.append(a.shape[0]), widen(a, b))[1])
        for rows in (x32, x32.repeat(4, 1)):
            torch.testing.assert_close(fp32_linear(rows, w).double(), rows.double() @ w.double().T,
                                       rtol=1e-5, atol=1e-5)
    assert calls == [3, 12]


# ---- offload ----------------------------------------------------------------------------------

def test_offload_threshold_formula():
    B, flops = 24_772_608, expert_flops_per_token(7168, 2048, 8)
    assert flops == 2 * 3 * 7168 * 2048 * 8
    sp = PrefillSpeeds(pcie_gbps=25.0, cpu_tokens_per_s=1000.0, gpu_flops=200e12)
    n = offload_threshold(sp, 384, B, flops)
    assert n == pytest.approx(1000 * 384 * B / 25e9)  # = 380.5 tokens
    assert prefill_on_gpu(381, sp, 384, B, flops) and not prefill_on_gpu(380, sp, 384, B, flops)
    assert offload_threshold(sp, 40, B, flops) == pytest.approx(n * 40 / 384)  # fewer experts touched
    slow_gpu = PrefillSpeeds(25.0, 1000.0, gpu_flops=1000 * flops)  # the GPU is no faster than the CPU
    assert offload_threshold(slow_gpu, 384, B, flops) == math.inf and not prefill_on_gpu(10**9, slow_gpu, 384, B, flops)


def test_measure_pcie():
    got = measure_pcie_gbps(nbytes=1 << 20, repeats=2)
    assert (got is None) if not CUDA else got > 0


def test_layer_uploader_yields_the_sources():
    rng = np.random.default_rng(0)
    layers = []
    for i in range(5):
        packed = rng.integers(-2**31, 2**31, (8 + i, 4), dtype=np.int64).astype(np.int32)
        scale = rng.integers(0, 2**16, (8 + i, 3), dtype=np.int64).astype(np.uint16)
        scale.flags.writeable = False  # as a checkpoint memmap is
        layers.append([packed, scale, torch.randn(3, 5).to(torch.bfloat16), torch.arange(7)])
    up = LayerUploader(capacity=4096, device=DEV)
    n = 0
    for got, src in zip(up.stream(iter(layers)), layers):
        for g, s in zip(got, src):
            assert g.device.type == DEV.type
            s = torch.from_numpy(s.copy()) if isinstance(s, np.ndarray) else s
            assert g.dtype == s.dtype and g.shape == s.shape and torch.equal(g.cpu(), s)
        n += 1
    assert n == 5 and list(up.stream([])) == []
    with pytest.raises(ValueError, match="capacity"):
        next(LayerUploader(64, DEV).stream([[np.zeros(100, np.uint8)]]))


# ---- graphs -----------------------------------------------------------------------------------

def decode_step_inputs(S=64, seed=5):
    x = mla_inputs(1, S, seed=seed)
    fn = lambda q, qpe, pos: mla_decode(q, qpe, x["kv"], x["k_pe"], x["w_uk"], x["w_uv"], SCALE, pos)  # noqa: E731
    return x, fn


def test_graphed_step_falls_back_to_eager_on_cpu():
    x, fn = decode_step_inputs()
    cpu = {k: v.cpu() for k, v in x.items()}

    def fn_cpu(q, qpe, pos):
        return mla_decode(q, qpe, cpu["kv"], cpu["k_pe"], cpu["w_uk"], cpu["w_uv"], SCALE, pos)

    step = GraphedStep(fn_cpu, cpu["q_nope"], cpu["q_pe"], torch.tensor(10), enabled=True)
    assert not step.graphed
    for pos in (10, 30, 63):
        q = torch.randn(1, H, P)
        torch.testing.assert_close(step(q, cpu["q_pe"], torch.tensor(pos)), fn_cpu(q, cpu["q_pe"], torch.tensor(pos)),
                                   rtol=0, atol=0)
    cache = GraphCache(lambda a: a * 2, enabled=False)
    assert torch.equal(cache("bucket", torch.ones(3)), torch.full((3,), 2.0))


@cuda_only
def test_cuda_graph_replay_equals_eager():
    x, fn = decode_step_inputs()
    step = GraphedStep(fn, x["q_nope"], x["q_pe"], torch.tensor(10, device=DEV))
    assert step.graphed
    for seed, pos in ((1, 10), (2, 40), (3, 63)):
        y = mla_inputs(1, 1, seed=seed)
        p = torch.tensor(pos, device=DEV)
        torch.testing.assert_close(step(y["q_nope"], y["q_pe"], p).clone(), fn(y["q_nope"], y["q_pe"], p),
                                   rtol=1e-5, atol=1e-5)


# ---- the contract with hybrid.model.k2 and the checkpoint (how the engine calls these) -------------

def kernel_attention(model, i, x, cache, s0, cos, sin, mode):
    """Model.attention's math routed through kernels_gpu: the wiring the engine uses."""
    from hybrid.model.linear import as_dtype, linear
    from hybrid.model.k2 import LATENT_NORM_EPS, apply_rope, rms_norm
    c, w, p = model.cfg, model.w, f"model.layers.{i}.self_attn."
    T, Hh, Pp, Rr, Ll, Vv = (x.shape[0], c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim,
                             c.kv_lora_rank, c.v_head_dim)
    q = linear(rms_norm(linear(x, w[p + "q_a_proj.weight"]), w[p + "q_a_layernorm.weight"], LATENT_NORM_EPS),
               w[p + "q_b_proj.weight"]).view(T, Hh, Pp + Rr)
    q_nope, q_pe = q[..., :Pp], apply_rope(q[..., Pp:], cos, sin)
    kv = linear(x, w[p + "kv_a_proj_with_mqa.weight"])
    cache.kv[i, s0:s0 + T] = rms_norm(kv[:, :Ll], w[p + "kv_a_layernorm.weight"], LATENT_NORM_EPS)
    cache.pe[i, s0:s0 + T] = apply_rope(kv[:, Ll:], cos, sin)
    w_kv_b = as_dtype(w[p + "kv_b_proj.weight"], q_nope.dtype).view(Hh, Pp + Vv, Ll)  # bf16 as held under bf16w
    w_uk, w_uv = w_kv_b[:, :Pp], w_kv_b[:, Pp:]  # [H, P, L], [H, V, L]
    args = (q_nope, q_pe, cache.kv[i, :s0 + T], cache.pe[i, :s0 + T], w_uk, w_uv, c.softmax_scale, s0)
    o = mla_decode(*args) if mode == "absorbed" else chunked_prefill_attention(*args, q_chunk=4, k_block=8)
    return linear(o.reshape(T, Hh * Vv), w[p + "o_proj.weight"])


@pytest.mark.parametrize("mode,s0,T", [("absorbed", 0, 1), ("absorbed", 9, 2), ("naive", 0, 13), ("naive", 9, 13)])
def test_kernels_reproduce_model_attention(tiny_path, mode, s0, T):
    import hybrid
    model = hybrid.load(tiny_path, device="cpu").model  # fp32: the kernels' math against the model's, on any machine
    layer = model.cfg.moe_layers[0]
    g = torch.Generator().manual_seed(s0 + T)
    x = torch.randn(s0 + T, model.cfg.hidden_size, generator=g)
    pos = torch.arange(s0 + T, dtype=torch.float32)[:, None] * model.inv_freq[None, :]
    cos, sin = pos.cos(), pos.sin()
    ours, theirs = model.new_cache(32), model.new_cache(32)
    if s0:  # fill the first s0 positions of both caches identically
        model.attention(layer, x[:s0], theirs, 0, cos[:s0], sin[:s0], "naive")
        ours.kv[:], ours.pe[:] = theirs.kv, theirs.pe
    ref = model.attention(layer, x[s0:], theirs, s0, cos[s0:], sin[s0:], mode)
    got = kernel_attention(model, layer, x[s0:], ours, s0, cos[s0:], sin[s0:], mode)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# ---- the timing script ------------------------------------------------------------------------

def test_bench_small_prints_json():
    out = subprocess.run([sys.executable, "-m", "hybrid.bench.gpu_kernels", "--small", "--repeats", "1", "--cpu-tps", "1",
                          "--pcie-gbps", "25"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert set(res) >= {"device", "mla_decode", "int4_expert", "int8_linear", "pcie_gbps", "offload"}
    assert res["mla_decode"]["ctx128"]["ms"] > 0
    assert res["int8_linear"]["kernel"] == ("triton" if CUDA else "aten") and res["int8_linear"]["ms"] > 0
    n = res["offload"]["threshold_tokens"]  # None (never) only if the measured GEMM is absurdly slow
    assert n is None or n > 0
    assert res["hot_moe_decode"] is None if not CUDA else res["hot_moe_decode"]["fused_ms"] > 0


def test_gpu_check_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0


def test_host_funcs_without_cuda_run_in_order_and_keep_the_first_error():
    from hybrid.runtime.graphs import HostFuncs

    host, seen = HostFuncs(cuda=False), []
    ok = host.add(lambda: seen.append(host.running))
    bad = host.add(lambda: 1 / 0)
    worse = host.add(lambda: [][1])
    for key in (ok, bad, worse, ok):
        host.launch(key)
    assert seen == [True, True] and not host.running  # every one ran, in order, even after errors
    with pytest.raises(ZeroDivisionError):
        host.raise_error()  # the first error, once
    host.raise_error()
    host.cancelled = True  # an abandoned step: what is still queued returns at once
    for key in (ok, bad):
        host.launch(key)
    host.raise_error()
    assert seen == [True, True]


@cuda_only
def test_host_function_inside_a_cuda_graph_hands_data_to_the_host_and_back():
    """A graph: kernel -> pinned buffer -> host function (numpy, on the driver's thread) -> pinned
    buffer -> kernel. Replayed with new inputs, waited for by polling: equal to the same steps eagerly;
    an error in the host function comes back to the caller."""
    from hybrid.runtime.graphs import GraphChain, HostFuncs

    w = torch.randn(64, 64, device="cuda")
    inp, to_host, from_host = (torch.zeros(1, 64).pin_memory() for _ in range(3))
    out = torch.zeros(1, 64, device="cuda")
    host, fail = HostFuncs(cuda=True), []

    def on_host():
        if fail:
            raise ValueError("host side failed")
        np.multiply(to_host.numpy(), 3.0, out=from_host.numpy())

    key = host.add(on_host)

    def token():
        to_host.copy_(torch.tanh(inp.to("cuda", non_blocking=True) @ w), non_blocking=True)
        host.launch(key)
        out.copy_(from_host.to("cuda", non_blocking=True) @ w.T)

    event = torch.cuda.Event()
    inp.copy_(torch.randn(1, 64))
    token()  # warm-up, eagerly: the host function runs for real
    HostFuncs.wait(event)
    chain = GraphChain([token])
    for seed in range(3):
        x = torch.randn(1, 64, generator=torch.Generator().manual_seed(seed))
        inp.copy_(x)
        chain.replay(0)
        HostFuncs.wait(event)
        host.raise_error()
        want = (3 * torch.tanh(x.cuda() @ w)) @ w.T
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    fail.append(1)
    chain.replay(0)
    HostFuncs.wait(event)
    with pytest.raises(ValueError, match="host side failed"):
        host.raise_error()


@cuda_only
def test_graph_chain_passes_tensors_and_crosses_pinned_buffers():
    """Three graphs sharing a pool, chained through a dict and pinned host buffers in and out, replayed
    in order with new host inputs: equal to the same three functions run eagerly."""
    from hybrid.runtime.graphs import GraphChain

    w = torch.randn(64, 64, device="cuda")
    inp, mid, out = (torch.zeros(1, 64).pin_memory() for _ in range(3))
    env: dict = {}

    def a():
        env["h"] = torch.tanh(inp.to("cuda", non_blocking=True) @ w)
        mid.copy_(env["h"], non_blocking=True)

    def b():
        env["g"] = env["h"] * 2 + 1

    def c():
        out.copy_(env["g"] @ w.T + env["h"], non_blocking=True)

    inp.copy_(torch.randn(1, 64))
    for fn in (a, b, c):  # warm-up, eagerly
        fn()
    torch.cuda.synchronize()
    chain = GraphChain([a, b, c])
    assert len(chain) == 3
    for seed in range(3):
        x = torch.randn(1, 64, generator=torch.Generator().manual_seed(seed))
        inp.copy_(x)
        for k in range(3):
            chain.replay(k)
        torch.cuda.synchronize()
        h = torch.tanh(x.cuda() @ w)
        torch.testing.assert_close(mid, h.cpu(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, ((h * 2 + 1) @ w.T + h).cpu(), rtol=1e-4, atol=1e-4)
