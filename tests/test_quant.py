"""INT4 packing against compressed-tensors' own pack_to_int32 / unpack_from_int32, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid.checkpoint.int4 import bf16_to_f32, dequantize_int4, f32_to_bf16, pack_int4, quantize_int4, unpack_int4

ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


@pytest.mark.parametrize("shape", [(1, 8), (7, 64), (33, 256)])
def test_pack_matches_compressed_tensors(shape):
    rng = np.random.default_rng(sum(shape))
    q = rng.integers(-8, 8, size=shape, dtype=np.int8)
    q[0, 0] = -8  # the offset-binary corner: nibble 0
    ours = pack_int4(q)
    theirs = ct.pack_to_int32(torch.from_numpy(q), 4).numpy()
    assert ours.dtype == np.int32 and np.array_equal(ours, theirs)
    back = ct.unpack_from_int32(torch.from_numpy(ours), 4, torch.Size(shape)).numpy()
    assert np.array_equal(unpack_int4(ours), back)
    assert np.array_equal(unpack_int4(ours), q)


def test_worked_example():
    # research notes: q = [1,-2,3,-8,7,0,-1,5] -> 0xD78F0B69
    w = pack_int4(np.array([[1, -2, 3, -8, 7, 0, -1, 5]], dtype=np.int8))
    assert w.view(np.uint32)[0, 0] == 0xD78F0B69 and w[0, 0] == -678491287


def test_quantize_dequantize_roundtrip_is_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    packed, scale = quantize_int4(w, group=32)
    deq = dequantize_int4(packed, scale, w.shape)
    step = np.repeat(bf16_to_f32(scale), 32, axis=1)
    # symmetric min-max to 7: values near -absmax clip to -7 steps, others round: error <= step/2
    assert np.all(np.abs(deq - w) <= step * 0.5 + 1e-6)


def test_bf16_conversion_matches_torch():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    bits = f32_to_bf16(x)
    assert np.array_equal(bf16_to_f32(bits), torch.from_numpy(x).bfloat16().float().numpy())
