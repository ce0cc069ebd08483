"""runtime/gpu_side.py: the engine's host copies of the non-expert weights."""
from __future__ import annotations

import re
import sys

import pytest
import torch

from hybrid.runtime.gpu_side import gpu_side_weight, host_copy


def _vm_flags(addr: int) -> list[str]:
    """VmFlags of the mapping of this process that holds addr (Linux /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                inside = int(m.group(1), 16) <= addr < int(m.group(2), 16)
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_host_copy_is_an_exact_copy_in_its_own_memory(dtype):
    src = torch.randn(3000, 700).to(torch.bfloat16)  # 4.2 MB: numpy's huge-page threshold is 4 MB
    out = host_copy(src, dtype)
    assert out.dtype == (dtype or torch.bfloat16) and out.shape == src.shape and out.is_contiguous()
    assert torch.equal(out.float(), src.float())  # bf16 -> fp32 is exact
    assert out.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()
    src.zero_()
    assert out.abs().sum() > 0  # shares nothing with the source


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_big_host_copies_are_marked_for_huge_pages():
    # numpy madvises blocks from 4 MB (MADV_HUGEPAGE: VmFlags 'hg'); torch's own allocation is not
    out = host_copy(torch.ones(4096, 1024, dtype=torch.bfloat16))  # 8 MB
    assert "hg" in _vm_flags(out.data_ptr() + out.nbytes // 2)


def test_gpu_side_weight_on_the_cpu_keeps_no_view_of_the_checkpoint():
    t = torch.randn(256, 512).to(torch.bfloat16)
    for kw in (dict(bf16w=True), dict(), dict(int8=True)):
        w = gpu_side_weight("model.layers.0.self_attn.o_proj.weight", t, torch.device("cpu"), torch.float32, **kw)
        q = w[0] if isinstance(w, tuple) else w
        assert q.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    assert torch.equal(gpu_side_weight("model.layers.0.self_attn.o_proj.weight", t, torch.device("cpu"),
                                       torch.float32), t.float())
    emb = gpu_side_weight("model.embed_tokens.weight", t, torch.device("cpu"), torch.float32)
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, t)
