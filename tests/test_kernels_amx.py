"""kernels_cpu.amx_gemm, fp32 prompt products through AMX's bf16 tiles, against float64 products of the
same bf16 weights; and the repackings both tile kernels read, on any CPU. On a CPU without AMX-BF16
(AMD, Intel before Sapphire Rapids) the tile products skip and the products take the widening GEMM,
which test_model_hf's end-to-end comparisons cover; the repackings are still checked there, against
a NumPy emulation of the tile instructions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid.model.linear import widening_linear
from kernels_cpu import amx, amx_gemm
from kernels_cpu.actq import QMAX, VNNI, quantize_rows
from kernels_cpu.simd import vector_lanes

tiles = pytest.mark.skipif(not amx.available(bf16=True), reason="needs AMX-BF16 (Intel Sapphire Rapids and later)")


def _case(T: int, I: int, O: int, seed: int):
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.standard_normal((O, I)).astype(np.float32) * 0.02).bfloat16()
    x = rng.standard_normal((T, I)).astype(np.float32)
    x[0, :5] = [1e-30, -3e-20, 65504.0, 0.0, 1.0 + 2 ** -20]  # tiny, large and exactly-split values
    return x, w


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@tiles
@pytest.mark.parametrize("T, I, O", [(9, 96, 64), (33, 1056, 96), (70, 2080, 32)])
def test_bf16x3_product_is_fp32_up_to_summation(T, I, O):
    """Token counts that are not whole tiles, K past one chunk (KC) with a partial last one: the result
    is as close to the float64 product as torch's fp32 matmul of the widened weights is."""
    x, w = _case(T, I, O, seed=T)
    got = amx_gemm.gemm_bf16x3(x, w.view(torch.int16).numpy().view(np.uint16))
    ref = x.astype(np.float64) @ w.double().numpy().T
    fp32 = (torch.from_numpy(x) @ w.float().T).numpy()
    assert got.shape == (T, O) and got.dtype == np.float32
    assert _rel(got, ref) <= max(2 * _rel(fp32, ref), 1e-7)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@tiles
def test_split_parts_are_exact():
    """x = x1 + x2 + x3 with each part a bf16 value: a row of one weight 1.0 reproduces x exactly."""
    T, I, O = 16, 64, 32
    x = np.random.default_rng(3).standard_normal((T, I)).astype(np.float32) * np.float32(1e3)
    w = torch.zeros(O, I, dtype=torch.bfloat16)
    for o in range(O):
        w[o, o] = 1.0
    got = amx_gemm.gemm_bf16x3(x, w.view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(got, x[:, :O])


@tiles
def test_widening_linear_takes_the_tiles_for_prompts_and_the_gemv_for_decode():
    x, w = _case(40, 128, 64, seed=5)
    ref = x.astype(np.float64) @ w.double().numpy().T
    y = widening_linear(torch.from_numpy(x).view(2, 20, 128), w)
    assert y.shape == (2, 20, 64) and _rel(y.reshape(40, 64).numpy(), ref) <= 1e-6
    one = widening_linear(torch.from_numpy(x[:1]), w)
    assert _rel(one.numpy(), ref[:1]) <= 1e-6


@tiles
def test_refuses_shapes_it_cannot_tile():
    with pytest.raises(ValueError, match="O % 32"):
        amx_gemm.gemm_bf16x3(np.zeros((16, 64), np.float32), np.zeros((48, 64), np.uint16))


@tiles
def test_int8_codes_with_row_scales():
    """int8 weight-only codes (gpu_precision 'int8') go through the same tiles, converted to bf16 per
    block of rows (exact), each row's sum then scaled: against float64 over the dequantised weights."""
    from kernels_gpu.int8 import quantize_int8

    x, w = _case(40, 1056, 64, seed=9)
    q, scale = quantize_int8(w.float())
    got = amx_gemm.gemm_bf16x3(x, q.numpy(), scale.float().numpy())
    deq = q.double() * scale.double()[:, None]
    ref = x.astype(np.float64) @ deq.numpy().T
    fp32 = (torch.from_numpy(x) @ deq.float().T).numpy()
    assert _rel(got, ref) <= max(2 * _rel(fp32, ref), 1e-7)


@tiles
def test_int8_codes_as_tiles_give_the_rows_bits():
    """int8 codes held as kernels_cpu.int8tiles' tiles (int8w on the CPU) go through the same tiles in the same
    order: the same bits as the codes in rows, over several chunks of K (KC) and a last part chunk."""
    from kernels_cpu.int8tiles import tile_rows

    rng = np.random.default_rng(12)
    q = rng.integers(-127, 128, (64, 2560), dtype=np.int8)  # 2.5 chunks of K
    scale = rng.uniform(0.001, 0.01, 64).astype(np.float32)
    x = rng.standard_normal((40, 2560)).astype(np.float32)
    np.testing.assert_array_equal(amx_gemm.gemm_bf16x3(x, tile_rows(q), scale), amx_gemm.gemm_bf16x3(x, q, scale))
    with pytest.raises(ValueError, match="O % 32"):
        amx_gemm.gemm_bf16x3(x[:, :512], tile_rows(q[:8, :512]), scale[:8])


def test_pack_x3_splits_each_activation_exactly():
    """The three bf16 parts pack_x3 writes sum to each fp32 activation exactly (tiny, large and
    ordinary values), in the tile kernel's layout, with the padding tokens zero. Runs on any CPU."""
    x, _ = _case(37, 2080, 32, seed=4)
    Tp = 64
    xp = amx_gemm.pack_x3(x, Tp)  # [chunks, Tp/32, 3, KC/32, 2, 16, 16] of two bf16
    with np.errstate(invalid="ignore"):  # the never-written steps (below) may hold NaN bits; cut off after
        halves = np.stack([(xp & 0xFFFF) << 16, xp & 0xFFFF0000], -1).view(np.float32).astype(np.float64)
    # [chunk c, pair t2, split s, step k, block tb, row kk, token n, half i]: column c KC + 32 k + 2 kk + i,
    # token 32 t2 + 16 tb + n; the last chunk's steps past the columns are never written nor read
    I, nc = x.shape[1], xp.shape[0]
    got = halves.transpose(1, 4, 6, 2, 0, 3, 5, 7).reshape(Tp, 3, nc * amx_gemm.KC)[:, :, :I]
    np.testing.assert_array_equal(got[:37].sum(1).astype(np.float32), x)
    assert (got[37:] == 0).all()
    assert np.abs(got[:37, 1]).max() > 0 and np.abs(got[:37, 2]).max() > 0  # the low parts carry bits


@pytest.mark.skipif(not (VNNI and vector_lanes() == 32), reason="the expert tiles read zmm VNNI-layout activations")
def test_expert_tile_repacking_against_an_emulated_tdpbssd():
    """amx.unpack_rows and pack_tokens, through a NumPy tdpbssd (A [16, 32] x B [8, 64] int8 -> C [16, 16]
    int32 per group) and the kernel's scaling, give the int4 x int16 product of 16 rows and 11 tokens
    (a partial block). Runs wherever the activations are in the VNNI layout, AMX or not."""
    from numba import njit

    from hybrid.checkpoint.int4 import dequantize_int4, quantize_int4

    rng = np.random.default_rng(6)
    D, T, G = 256, 11, 256 // 32
    packed, scale = quantize_int4(rng.standard_normal((16, D)).astype(np.float32) * 0.05)
    w = dequantize_int4(packed, scale, (16, D)).astype(np.float64)
    x = rng.standard_normal((T, D)).astype(np.float32)
    xa, dg, xs = np.empty((T, D), np.int16), np.empty((T, G), np.float32), np.empty((T, G), np.float32)
    quantize_rows(x, xa, dg, xs)
    pk = np.ascontiguousarray(packed).view(np.uint8)
    sc = np.ascontiguousarray(scale).view(np.uint16)

    @njit
    def repack(pk, sc, xa, dg, toks, a, wsT, bt, dgb):
        amx.unpack_rows(pk.ctypes.data, D // 2, sc.ctypes.data, G * 2, D, a, wsT)
        amx.pack_tokens(xa.view(np.int32).reshape(-1), D // 2, dg, toks, toks.shape[0], G, bt, dgb)

    a, wsT = np.empty((16, D), np.int8), np.empty((G, 16), np.float32)
    bt, dgb = np.empty((G, 2, 8, 16), np.int32), np.empty((G, 16), np.float32)
    repack(pk, sc, xa, dg, np.arange(T, dtype=np.int64), a, wsT, bt, dgb)
    assert QMAX < 32640  # the codes split into two signed bytes
    acc = np.zeros((16, 16))
    for g in range(G):
        A = a[:, 32 * g:32 * g + 32].astype(np.int64)  # [16 rows, 32 K]
        B = bt[g].view(np.int8).reshape(2, 8, 16, 4).transpose(0, 2, 1, 3).reshape(2, 16, 32).astype(np.int64)
        Ch, Cl = A @ B[0].T, A @ B[1].T  # [16 rows, 16 tokens]
        acc += (Ch * 256 + Cl) * wsT[g][:, None].astype(np.float64) * dgb[g][None, :].astype(np.float64)
    ref = w @ x.astype(np.float64).T
    assert np.abs(acc[:, T:]).max() == 0  # the padding tokens
    assert np.linalg.norm(acc[:, :T] - ref) / np.linalg.norm(ref) <= 1e-4
