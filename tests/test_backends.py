"""Placement invariance: the Numba INT4 backend (mmap'd shards) gives the reference backend's answers."""
from __future__ import annotations

import pytest
import torch

import hybrid
from kernels_cpu.simd import host_has_avx2

pytestmark = pytest.mark.skipif(not host_has_avx2(), reason="the Numba INT4 kernels need AVX2 + FMA")


def test_numba_backend_matches_reference(tiny_path):
    ref = hybrid.load(tiny_path, backend="reference")
    fast = hybrid.load(tiny_path, backend="numba")
    ids = torch.randint(0, ref.config.vocab_size, (33,), generator=torch.Generator().manual_seed(5))
    a, b = ref.logits(ids), fast.logits(ids)
    assert (a - b).abs().max() <= 1e-3 * a.abs().max()  # int16 activations inside the kernel
    prompt = ids.tolist()
    greedy_ref = [s.token for s in ref.generate(prompt, 16, temperature=0)]
    greedy_fast = [s.token for s in fast.generate(prompt, 16, temperature=0)]
    assert greedy_ref == greedy_fast
