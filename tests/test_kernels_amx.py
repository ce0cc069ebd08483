"""kernels_cpu.amx_gemm, fp32 prompt products through AMX's bf16 tiles, against float64 products of the
same bf16 weights. On a CPU without AMX-BF16 (AMD, Intel before Sapphire Rapids) these tests skip and
the products take the widening GEMM, which test_model_hf's end-to-end comparisons cover."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid.model.linear import widening_linear
from kernels_cpu import amx, amx_gemm

pytestmark = pytest.mark.skipif(not amx.available(bf16=True), reason="needs AMX-BF16 (Intel Sapphire Rapids and later)")


def _case(T: int, I: int, O: int, seed: int):
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.standard_normal((O, I)).astype(np.float32) * 0.02).bfloat16()
    x = rng.standard_normal((T, I)).astype(np.float32)
    x[0, :5] = [1e-30, -3e-20, 65504.0, 0.0, 1.0 + 2 ** -20]  # tiny, large and exactly-split values
    return x, w


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


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


def test_split_parts_are_exact():
    """x = x1 + x2 + x3 with each part a bf16 value: a row of one weight 1.0 reproduces x exactly."""
    T, I, O = 16, 64, 32
    x = np.random.default_rng(3).standard_normal((T, I)).astype(np.float32) * np.float32(1e3)
    w = torch.zeros(O, I, dtype=torch.bfloat16)
    for o in range(O):
        w[o, o] = 1.0
    got = amx_gemm.gemm_bf16x3(x, w.view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(got, x[:, :O])


def test_widening_linear_takes_the_tiles_for_prompts_and_the_gemv_for_decode():
    x, w = _case(40, 128, 64, seed=5)
    ref = x.astype(np.float64) @ w.double().numpy().T
    y = widening_linear(torch.from_numpy(x).view(2, 20, 128), w)
    assert y.shape == (2, 20, 64) and _rel(y.reshape(40, 64).numpy(), ref) <= 1e-6
    one = widening_linear(torch.from_numpy(x[:1]), w)
    assert _rel(one.numpy(), ref[:1]) <= 1e-6


def test_refuses_shapes_it_cannot_tile():
    with pytest.raises(ValueError, match="O % 32"):
        amx_gemm.gemm_bf16x3(np.zeros((16, 64), np.float32), np.zeros((48, 64), np.uint16))


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
