"""kernels_cpu/step_ops.py, a CPU decode step's RMSNorm and router choice, against torch's forms."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels_cpu import step_ops


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
