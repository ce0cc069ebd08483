"""Invariants of the forward pass: absorbed MLA == naive MLA; prefill N then decode M == full N+M."""
from __future__ import annotations

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


def test_logits_rejects_bad_ids(tiny_path):
    e = hybrid.load(tiny_path)
    import pytest
    with pytest.raises(ValueError, match="token ids must lie"):
        e.logits([0, e.config.vocab_size])
    with pytest.raises(ValueError, match="non-empty"):
        e.logits([])
