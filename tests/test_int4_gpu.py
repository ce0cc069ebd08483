"""kernels_gpu.int4 and int4_triton against slow references, on whatever device is present.

References: hybrid.checkpoint.int4's numpy dequantisation (itself checked against compressed-tensors) and an
all-CPU fp32 MoE over dequantised experts; the hot split fed from Checkpoint.expert against the
ReferenceExperts backend. The Triton kernel runs in Triton's interpreter without CUDA (conftest sets
TRITON_INTERPRET); test_triton_compile.py compiles it for real GPUs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybrid.checkpoint.int4 import bf16_to_f32, dequantize_int4, pack_int4, quantize_int4, unpack_int4
from hybrid.experts.hot import HotSlots, fused_kernel, hot_moe_by_slot
from kernels_gpu.int4 import DeviceInt4, cold_pairs, dequantize, hot_expert_moe, int4_expert, int4_linear

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), rtol=tol, atol=tol)


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


def int4_rule(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The slow reference: w[o, i] = q[o, i] * scale[o, i // G], q unpacked as compressed-tensors does
    (tests/test_quant.py holds unpack_int4 to it) -> fp32 [O, I]."""
    q = unpack_int4(packed).astype(np.float32)
    return q * np.repeat(bf16_to_f32(scale), q.shape[1] // scale.shape[1], axis=1)


def test_dequantize_matches_compressed_tensors_rule_bit_for_bit():
    packed, scale = int4_arrays((48, 96), 0)
    w = DeviceInt4.from_arrays(packed, scale, (48, 96), DEV)
    ours = dequantize(w.packed, w.scale, 48, 96).cpu().numpy()
    np.testing.assert_array_equal(ours, int4_rule(packed, scale))
    np.testing.assert_array_equal(dequantize_int4(packed, scale, (48, 96)), int4_rule(packed, scale))  # numpy's door


def test_int4_linear_matches_reference():
    packed, scale = int4_arrays((40, 128), 1)
    w = DeviceInt4.from_arrays(packed, scale, (40, 128), DEV)
    x = torch.randn(5, 128).to(DEV)
    ref = x.double().cpu() @ torch.from_numpy(int4_rule(packed, scale)).double().T
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
        dense.append({p: torch.from_numpy(int4_rule(*ex[p])) for p in ex})
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
    def addresses():
        return [t.data_ptr() for d in (slots.packed, slots.scale) for t in d.values()] + [slots.slot_of.data_ptr()]

    ptrs = addresses()
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
    assert addresses() == ptrs  # nothing moved
    ids = torch.tensor([[0, 1, 2], [5, 4, 3]])
    assert np.array_equal(slots.cold(ids.numpy()), cold_pairs(ids, [1, 2, 5]).numpy())  # the host's own copy
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
    pytest.importorskip("triton", reason="Triton is in [dev] on x86-64 Linux only")
    from kernels_gpu.int4_triton import fused_hot_moe

    arrays, dense = make_experts(3)
    x, ids, weights = hot_moe_inputs(T, T)
    slots = slots_with(arrays, hot_ids, capacity=6)
    ref, cold = hot_expert_moe(x, ids, weights, hot_set(arrays, hot_ids))
    args = (x.to(DEV), ids.to(DEV), weights.to(DEV))

    def kernel(*a: torch.Tensor) -> torch.Tensor:  # the Triton kernel takes the slots' tensors
        return fused_hot_moe(*a, slots.slot_of, slots.packed, slots.scale)

    for fn in (lambda *a: hot_moe_by_slot(*a, slots), kernel, lambda *a: fused_kernel(True, False)(*a, slots)):
        y = fn(*args)
        assert y.dtype == torch.float32 and y.shape == (T, D)
        torch.testing.assert_close(y.cpu(), ref.cpu(), rtol=1e-5, atol=1e-6)
    full = ref_moe(x, ids, weights, dense)
    torch.testing.assert_close(kernel(*args).cpu() + ref_moe(x, ids, weights * cold, dense), full,
                               rtol=1e-5, atol=1e-6)


def test_fused_hot_moe_over_several_row_blocks_and_reduction_steps():
    """Shapes past one program's block both ways (rows and packed words), a bf16 x as on the GPU."""
    pytest.importorskip("triton", reason="Triton is in [dev] on x86-64 Linux only")
    from kernels_gpu.int4_triton import BLOCK_ROWS, BLOCK_WORDS, fused_hot_moe

    dims = (BLOCK_WORDS * 8 * 2 + 64, BLOCK_ROWS * 2 + 32)  # D 320: 2.5 reduction steps; F 96: 3 row blocks
    arrays = [{p: int4_arrays(shape, 10 + 3 * e + j) for j, (p, shape) in
               enumerate((("gate", dims[::-1]), ("up", dims[::-1]), ("down", dims)))} for e in range(4)]
    x, ids, weights = hot_moe_inputs(1, 7, 4, dims)
    x = x.to(torch.bfloat16)
    slots = slots_with(arrays, [ids[0, 0].item(), ids[0, 2].item()], capacity=2, dims=dims)
    ref, _ = hot_expert_moe(x.float(), ids, weights, hot_set(arrays, list(slots)))
    y = fused_hot_moe(x.to(DEV), ids.to(DEV), weights.to(DEV), slots.slot_of, slots.packed, slots.scale)
    torch.testing.assert_close(y.cpu(), ref.cpu(), rtol=1e-5, atol=1e-5)


@cuda_only
def test_int4_linear_bf16_on_cuda_close_to_fp32():
    packed, scale = int4_arrays((256, 512), 7)
    w = DeviceInt4.from_arrays(packed, scale, (256, 512), "cuda")
    x = torch.randn(3, 512, device="cuda")
    ref = x.double().cpu() @ torch.from_numpy(int4_rule(packed, scale)).double().T
    close(int4_linear(x.bfloat16(), w.packed, w.scale, 256, 512).float(), ref, 3e-2)


def test_hot_split_with_checkpoint_experts_equals_reference_backend(tiny_path):
    import hybrid
    from hybrid.experts.reference import ReferenceExperts
    e = hybrid.load(tiny_path, device="cpu")  # routing on the host, beside the CPU reference; hot experts on DEV
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


def test_bench_times_the_fused_hot_experts():
    """The hot-expert timing bench.run does on CUDA, at toy shapes here (the interpreter without CUDA)."""
    pytest.importorskip("triton", reason="Triton is in [dev] on x86-64 Linux only")
    from hybrid.bench import gpu_kernels as bench

    res = bench._hot_moe(bench.SMALL, DEV, 1)
    assert res["experts"] == 8 and res["fused_ms"] > 0 and res["torch_loop_ms"] > 0 and res["fused_gbps"] > 0


def test_one_rule_for_when_the_fused_kernel_runs(monkeypatch):
    """fused_kernel: the scheduler's and the decode step's switch (None: on CUDA when Triton imports),
    which hands a HotSlots' tensors to the Triton kernel."""
    assert fused_kernel(False, True) is None and fused_kernel(None, False) is None
    pytest.importorskip("triton", reason="Triton is in [dev] on x86-64 Linux only")
    import hybrid.experts.hot as hs
    import kernels_gpu.int4_triton as kt

    seen = []
    monkeypatch.setattr(kt, "fused_hot_moe", lambda *a: seen.append(a) or "y")
    hs._triton_kernel.cache_clear()  # imported afresh: the recording one
    try:
        fused = fused_kernel(True, False)
        assert fused is not None and fused_kernel(None, True) is fused
        slots = HotSlots(2, 4, 32, 32)
        assert fused("x", "ids", "w", slots) == "y"
        assert seen == [("x", "ids", "w", slots.slot_of, slots.packed, slots.scale)]
    finally:
        hs._triton_kernel.cache_clear()  # forget the recording kernel
