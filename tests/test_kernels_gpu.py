"""kernels_gpu against slow, obviously-correct references, on whatever device is present.

MLA: a full-softmax naive attention in float64 (keys and values expanded per head, a [T, H, S] score
matrix). INT4: hybrid.quant's numpy dequantisation and an all-CPU fp32 MoE. int8: an analytic error
bound. Offload: hand-computed thresholds and byte equality of uploads. Graphs: eager == graph.
Contract: hybrid.model's attention (both forms) rebuilt through these kernels on a tiny checkpoint,
and the hot split fed from Checkpoint.expert against the ReferenceExperts backend.
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
import torch.nn.functional as F

from hybrid.quant import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from kernels_gpu.graphs import GraphCache, GraphedStep
from kernels_gpu.int4 import (DeviceInt4, HotSlots, cold_pairs, dequantize, hot_expert_moe, hot_moe_by_slot,
                               int4_expert, int4_linear)
from kernels_gpu.int8 import int8_linear, quantize_int8
from kernels_gpu.mla import absorb_query, chunked_prefill_attention, mla_decode
from kernels_gpu.offload import (LayerUploader, PrefillSpeeds, expert_flops_per_token, measure_pcie_gbps,
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


# ---- INT4 -------------------------------------------------------------------------------------

D, FF, E, K = 64, 32, 6, 3  # hidden, expert intermediate, experts, slots


def int4_arrays(shape, seed):
    """quantize_int4 of random weights with ~5% of codes forced to -8 and 7 (both nibble extremes)."""
    rng = np.random.default_rng(seed)
    packed, scale = quantize_int4(rng.standard_normal(shape).astype(np.float32) * 0.05)
    q = unpack_int4(packed)
    q[rng.random(q.shape) < 0.03] = -8
    q[rng.random(q.shape) < 0.02] = 7
    return pack_int4(q), scale


def test_dequantize_matches_compressed_tensors_rule_bit_for_bit():
    packed, scale = int4_arrays((48, 96), 0)
    w = DeviceInt4.from_arrays(packed, scale, (48, 96), DEV)
    ours = dequantize(w.packed, w.scale, 48, 96).cpu().numpy()
    np.testing.assert_array_equal(ours, dequantize_int4(packed, scale, (48, 96)))


def test_int4_linear_matches_reference():
    packed, scale = int4_arrays((40, 128), 1)
    w = DeviceInt4.from_arrays(packed, scale, (40, 128), DEV)
    x = torch.randn(5, 128).to(DEV)
    ref = x.double().cpu() @ torch.from_numpy(dequantize_int4(packed, scale, (40, 128))).double().T
    close(int4_linear(x, w.packed, w.scale, 40, 128), ref)
    close(int4_linear(x[:1], w.packed, w.scale.view(torch.int16), 40, 128), ref[:1])  # GEMV, scales as bits
    with pytest.raises(ValueError, match="group"):
        int4_linear(x, w.packed, w.scale, 40, 128, group=64)


def make_experts(seed: int = 0):
    """E experts: the arrays (as on disk) and fp32 dequantised weights for the reference."""
    arrays, dense = [], []
    for e in range(E):
        ex = {proj: int4_arrays(shape, seed * 100 + 3 * e + j)
              for j, (proj, shape) in enumerate((("gate", (FF, D)), ("up", (FF, D)), ("down", (D, FF))))}
        arrays.append(ex)
        dense.append({p: torch.from_numpy(dequantize_int4(*ex[p], ex[p][0].shape[:1] + (ex[p][0].shape[1] * 8,)))
                      for p in ex})
    return arrays, dense


def ref_moe(x, ids, weights, dense):
    """All-CPU fp32 routed experts: sum_k weights[t, k] * E_ids[t, k](x[t])."""
    y = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            w = dense[int(ids[t, k])]
            y[t] += weights[t, k] * ((F.silu(x[t] @ w["gate"].T) * (x[t] @ w["up"].T)) @ w["down"].T)
    return y


def hot_set(arrays, which):
    return {e: tuple(DeviceInt4.from_arrays(*arrays[e][p], (arrays[e][p][0].shape[0], arrays[e][p][0].shape[1] * 8),
                                            DEV) for p in ("gate", "up", "down")) for e in which}


def test_int4_expert_matches_reference():
    arrays, dense = make_experts()
    x = torch.randn(4, D)
    w = dense[2]
    ref = (F.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T
    close(int4_expert(x.to(DEV), *hot_set(arrays, [2])[2]), ref, 1e-5)


@pytest.mark.parametrize("hot_ids", [[1, 4], [0, 1, 2, 3, 4, 5], [], [5]])
def test_hot_split_plus_cpu_rest_equals_full_moe(hot_ids):
    arrays, dense = make_experts(1)
    g = torch.Generator().manual_seed(0)
    T = 7
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, K]
    ids[0, 1] = ids[0, 0]  # a repeated expert within one token is two pairs
    weights = torch.rand(T, K, generator=g) * 2.8
    y_hot, cold = hot_expert_moe(x.to(DEV), ids.to(DEV), weights.to(DEV), hot_set(arrays, hot_ids))
    assert y_hot.dtype == torch.float32 and cold.dtype == torch.bool and cold.shape == (T, K)
    assert torch.equal(cold.cpu(), ~torch.isin(ids, torch.tensor(hot_ids, dtype=ids.dtype)))
    assert torch.equal(cold_pairs(ids.to(DEV), hot_ids), cold)
    y_cpu = ref_moe(x, ids, weights * cold.cpu(), dense)  # what the CPU backend gets: cold pairs only
    full = ref_moe(x, ids, weights, dense)
    torch.testing.assert_close(y_hot.cpu() + y_cpu, full, rtol=1e-5, atol=1e-6)


def slots_with(arrays, which, capacity=None, dims=(D, FF)):
    slots = HotSlots(capacity or max(len(which), 1), len(arrays), *dims, device=DEV)
    for e, w in hot_set(arrays, which).items():
        slots.put(e, w)
    return slots


def test_hot_slots_change_in_place_and_read_back_what_was_put():
    arrays, _ = make_experts(2)
    slots = slots_with(arrays, [4, 1], capacity=3)
    ptrs = {p: t.data_ptr() for p, t in slots.packed.items()}
    assert list(slots) == [1, 4] and len(slots) == 2 and 3 not in slots
    assert slots.slot_of.tolist() == [-1, 1, -1, -1, 0, -1]
    want = hot_set(arrays, [0, 1, 2, 3, 4, 5])
    for e in (1, 4):
        for got, ref in zip(slots[e], want[e]):
            assert torch.equal(got.packed, ref.packed) and torch.equal(got.scale, ref.scale)
    assert slots.keep_only([5, 1, 2]) == [5, 2]  # 4 leaves; 5 and 2 are still to put
    assert list(slots) == [1] and slots.slot_of.tolist() == [-1, 1, -1, -1, -1, -1]
    for e in (5, 2):
        slots.put(e, want[e])
    assert slots.slot_of.tolist() == [-1, 1, 2, -1, -1, 0]  # 5 took the slot 4 left
    for e in (1, 2, 5):
        assert all(torch.equal(g.packed, r.packed) for g, r in zip(slots[e], want[e]))
    assert {p: t.data_ptr() for p, t in slots.packed.items()} == ptrs  # nothing moved
    with pytest.raises(ValueError, match="all 3 hot slots are taken"):
        slots.put(0, want[0])
    with pytest.raises(ValueError, match="does not fit"):
        HotSlots(1, E, 2 * D, FF, device=DEV).put(0, want[0])


def hot_moe_inputs(T, seed, n_experts=E, dims=(D, FF)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, dims[0], generator=g)
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:K] for _ in range(T)])
    ids[0, 1] = ids[0, 0]  # one expert twice in a token: two pairs
    weights = torch.rand(T, K, generator=g) * 2.8
    weights[-1, -1] = 0.0  # a dropped pair
    return x, ids, weights


@pytest.mark.parametrize("T,hot_ids", [(1, [1, 4]), (3, [0, 1, 2, 3, 4, 5]), (2, []), (3, [5, 2])])
def test_device_id_hot_moe_equals_the_per_expert_loop(T, hot_ids):
    """hot_moe_by_slot (torch, fixed shapes) and fused_hot_moe (Triton; its interpreter without CUDA)
    read the expert ids on the device; both equal hot_expert_moe's y_hot, and with the CPU's cold
    pairs the whole routed sum."""
    from kernels_gpu.int4_triton import fused_hot_moe  # the dev install has Triton (x86-64 Linux)

    arrays, dense = make_experts(3)
    x, ids, weights = hot_moe_inputs(T, T)
    slots = slots_with(arrays, hot_ids, capacity=6)
    ref, cold = hot_expert_moe(x, ids, weights, hot_set(arrays, hot_ids))
    args = (x.to(DEV), ids.to(DEV), weights.to(DEV), slots)
    for fn in (hot_moe_by_slot, fused_hot_moe):
        y = fn(*args)
        assert y.dtype == torch.float32 and y.shape == (T, D)
        torch.testing.assert_close(y.cpu(), ref.cpu(), rtol=1e-5, atol=1e-6)
    full = ref_moe(x, ids, weights, dense)
    torch.testing.assert_close(fused_hot_moe(*args).cpu() + ref_moe(x, ids, weights * cold, dense), full,
                               rtol=1e-5, atol=1e-6)


COMPILE_FUSED = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels_gpu.int4_triton as m

common = {"ids_ptr": "*i64", "w_ptr": "*fp32", "slot_ptr": "*i32"}
sigs = {m._gate_up_kernel: {"x_ptr": "*fp32", **common, "gp_ptr": "*i32", "gs_ptr": "*i16", "up_ptr": "*i32",
                            "us_ptr": "*i16", "h_ptr": "*fp32", "K": "i32", "D": "i32", "FF": "i32"},
        m._down_kernel: {"h_ptr": "*fp32", **common, "dp_ptr": "*i32", "ds_ptr": "*i16", "out_ptr": "*fp32",
                         "D": "i32", "FF": "i32"}}
consts = {"GROUP_WORDS": 4, "BLOCK_W": m.BLOCK_WORDS, "BLOCK_R": m.BLOCK_ROWS}
out = {}
for arch in map(int, sys.argv[1:]):
    for fn, sig in sigs.items():
        sig = {**{a: sig.get(a, "constexpr") for a in fn.arg_names}}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32))
        out[f"{fn.__name__}_sm{arch}"] = len(k.asm["cubin"])
print(json.dumps(out))
"""


def test_fused_hot_kernels_compile_for_nvidia_gpus():
    """The interpreter runs Python semantics; this compiles both kernels with Triton's real compiler
    (ptxas included, no GPU needed) for Ampere consumer cards (sm_86) and Hopper (sm_90), so a kernel
    that only the interpreter accepts fails here, not on a user's GPU."""
    pytest.importorskip("triton")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", COMPILE_FUSED, "86", "90"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    sizes = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(sizes) == {f"{k}_sm{a}" for k in ("_gate_up_kernel", "_down_kernel") for a in (86, 90)}
    assert all(n > 0 for n in sizes.values())


def test_fused_hot_moe_over_several_row_blocks_and_reduction_steps():
    """Shapes past one program's block both ways (rows and packed words), a bf16 x as on the GPU."""
    from kernels_gpu.int4_triton import BLOCK_ROWS, BLOCK_WORDS, fused_hot_moe

    dims = (BLOCK_WORDS * 8 * 2 + 64, BLOCK_ROWS * 2 + 32)  # D 320: 2.5 reduction steps; F 96: 3 row blocks
    arrays = [{p: int4_arrays(shape, 10 + 3 * e + j) for j, (p, shape) in
               enumerate((("gate", dims[::-1]), ("up", dims[::-1]), ("down", dims)))} for e in range(4)]
    x, ids, weights = hot_moe_inputs(1, 7, 4, dims)
    x = x.to(torch.bfloat16)
    slots = slots_with(arrays, [ids[0, 0].item(), ids[0, 2].item()], capacity=2, dims=dims)
    ref, _ = hot_expert_moe(x.float(), ids, weights, hot_set(arrays, list(slots)))
    torch.testing.assert_close(fused_hot_moe(x.to(DEV), ids.to(DEV), weights.to(DEV), slots).cpu(), ref.cpu(),
                               rtol=1e-5, atol=1e-5)


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
    for fused in (None, False):  # aten's int8 kernel where it runs, and the dequantising path
        y = int8_linear(x.to(DEV), q, scale, fused=fused).cpu()
        assert y.shape == (2, 3, 33) and bool(((y.double() - exact).abs() <= bound).all())
        torch.testing.assert_close(y, x @ (q.float() * scale.float()[:, None]).cpu().T, rtol=1e-5, atol=1e-5)


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


@cuda_only
def test_int4_linear_bf16_on_cuda_close_to_fp32():
    packed, scale = int4_arrays((256, 512), 7)
    w = DeviceInt4.from_arrays(packed, scale, (256, 512), "cuda")
    x = torch.randn(3, 512, device="cuda")
    ref = x.double().cpu() @ torch.from_numpy(dequantize_int4(packed, scale, (256, 512))).double().T
    close(int4_linear(x.bfloat16(), w.packed, w.scale, 256, 512).float(), ref, 3e-2)


# ---- the contract with hybrid.model and the checkpoint (how the engine calls these) -------------

def kernel_attention(model, i, x, cache, s0, cos, sin, mode):
    """Model.attention's math routed through kernels_gpu: the wiring the engine uses."""
    from hybrid.model import LATENT_NORM_EPS, apply_rope, rms_norm
    c, w, p = model.cfg, model.w, f"model.layers.{i}.self_attn."
    T, Hh, Pp, Rr, Ll, Vv = (x.shape[0], c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim,
                             c.kv_lora_rank, c.v_head_dim)
    q = (rms_norm(x @ w[p + "q_a_proj.weight"].T, w[p + "q_a_layernorm.weight"], LATENT_NORM_EPS)
         @ w[p + "q_b_proj.weight"].T).view(T, Hh, Pp + Rr)
    q_nope, q_pe = q[..., :Pp], apply_rope(q[..., Pp:], cos, sin)
    kv = x @ w[p + "kv_a_proj_with_mqa.weight"].T
    cache.kv[i, s0:s0 + T] = rms_norm(kv[:, :Ll], w[p + "kv_a_layernorm.weight"], LATENT_NORM_EPS)
    cache.pe[i, s0:s0 + T] = apply_rope(kv[:, Ll:], cos, sin)
    w_kv_b = w[p + "kv_b_proj.weight"].view(Hh, Pp + Vv, Ll)
    w_uk, w_uv = w_kv_b[:, :Pp], w_kv_b[:, Pp:]  # [H, P, L], [H, V, L]
    args = (q_nope, q_pe, cache.kv[i, :s0 + T], cache.pe[i, :s0 + T], w_uk, w_uv, c.softmax_scale, s0)
    o = mla_decode(*args) if mode == "absorbed" else chunked_prefill_attention(*args, q_chunk=4, k_block=8)
    return o.reshape(T, Hh * Vv) @ w[p + "o_proj.weight"].T


@pytest.mark.parametrize("mode,s0,T", [("absorbed", 0, 1), ("absorbed", 9, 2), ("naive", 0, 13), ("naive", 9, 13)])
def test_kernels_reproduce_model_attention(tiny_path, mode, s0, T):
    import hybrid
    model = hybrid.load(tiny_path).model
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


def test_hot_split_with_checkpoint_experts_equals_reference_backend(tiny_path):
    import hybrid
    from hybrid.reference import ReferenceExperts
    e = hybrid.load(tiny_path)
    cfg, ckpt = e.config, e.checkpoint
    layer = cfg.moe_layers[0]
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    ids, weights = e.model.route(layer, x)
    hot_ids = sorted(set(ids[:, 0].tolist()))  # every token's first expert is hot
    hot = {ex: tuple(DeviceInt4.from_arrays(w.packed, w.scale, w.shape, DEV)
                     for w in (ckpt.expert(layer, ex, p) for p in ("gate_proj", "up_proj", "down_proj")))
           for ex in hot_ids}
    y_hot, cold = hot_expert_moe(x.to(DEV), ids.to(DEV), weights.to(DEV), hot)
    ref = ReferenceExperts(ckpt)
    full = ref.wait(ref.submit(layer, x, ids, weights))
    rest = ref.wait(ref.submit(layer, x, ids, weights * cold.cpu()))
    assert bool(cold[:, 0].logical_not().all())
    torch.testing.assert_close(y_hot.cpu() + rest, full, rtol=1e-5, atol=1e-6)


# ---- the timing script ------------------------------------------------------------------------

def test_bench_small_prints_json():
    out = subprocess.run([sys.executable, "-m", "kernels_gpu.bench", "--small", "--repeats", "1", "--cpu-tps", "1",
                          "--pcie-gbps", "25"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert set(res) >= {"device", "mla_decode", "int4_expert", "int8_linear", "pcie_gbps", "offload"}
    assert res["mla_decode"]["ctx128"]["ms"] > 0
    n = res["offload"]["threshold_tokens"]  # None (never) only if the measured GEMM is absurdly slow
    assert n is None or n > 0
    assert res["hot_moe_decode"] is None if not CUDA else res["hot_moe_decode"]["fused_ms"] > 0


def test_bench_times_the_fused_hot_experts():
    """The hot-expert timing bench.run does on CUDA, at toy shapes here (the interpreter without CUDA)."""
    from kernels_gpu import bench

    res = bench._hot_moe(bench.SMALL, DEV, 1)
    assert res["experts"] == 8 and res["fused_ms"] > 0 and res["torch_loop_ms"] > 0 and res["fused_gbps"] > 0


def test_gpu_check_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0


def test_host_funcs_without_cuda_run_in_order_and_keep_the_first_error():
    from kernels_gpu.graphs import HostFuncs

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


@cuda_only
def test_host_function_inside_a_cuda_graph_hands_data_to_the_host_and_back():
    """A graph: kernel -> pinned buffer -> host function (numpy, on the driver's thread) -> pinned
    buffer -> kernel. Replayed with new inputs, waited for by polling: equal to the same steps eagerly;
    an error in the host function comes back to the caller."""
    from kernels_gpu.graphs import GraphChain, HostFuncs

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
    from kernels_gpu.graphs import GraphChain

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
