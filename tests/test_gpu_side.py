"""runtime/gpu_side.py: the engine's host copies of the non-expert weights."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hybrid.checkpoint.host_memory import HUGE
from hybrid.runtime.gpu_side import gpu_side_weight, host_copy


def _mapping(addr: int) -> tuple[str, int, list[str]]:
    """(name, AnonHugePages in bytes, VmFlags) of the mapping of this process that holds addr (Linux
    /proc/self/smaps)."""
    inside, name, huge = False, "", 0
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$", line)
            if m:
                inside, name = int(m.group(1), 16) <= addr < int(m.group(2), 16), m.group(3)
            elif inside and line.startswith("AnonHugePages:"):
                huge = int(line.split()[1]) * 1024
            elif inside and line.startswith("VmFlags:"):
                return name, huge, line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def _vm_flags(addr: int) -> list[str]:
    return _mapping(addr)[2]


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
    # advised (MADV_HUGEPAGE: VmFlags 'hg'); torch's own allocation is not
    out = host_copy(torch.ones(4096, 1024, dtype=torch.bfloat16))  # 8 MB
    assert "hg" in _vm_flags(out.data_ptr() + out.nbytes // 2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_host_copies_get_huge_pages_after_malloc_reused_freed_memory():
    """glibc raises its mmap threshold to a freed block's size (up to 32 MB), so blocks of a few MB come from
    memory freed earlier in the load, already in 4 KB pages: numpy's advice left such copies (k2-slice's
    kv_b, q_b, shared experts) on plain pages. A copy has a mapping of its own, starting on a huge page,
    advised, and where the kernel's setting allows it, on huge pages."""
    junk = np.ones(30 << 20, np.uint8)
    del junk
    out = host_copy(torch.ones(8 << 20, dtype=torch.bfloat16))  # 16 MB
    name, huge, flags = _mapping(out.data_ptr())
    assert out.data_ptr() % HUGE == 0 and "hg" in flags and name != "[heap]"
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if setting.exists() and "[never]" not in setting.read_text():
        assert huge >= out.nbytes
    part = host_copy(torch.ones(5 << 19, dtype=torch.bfloat16))  # 5 MB: two whole huge pages and a part
    assert torch.equal(part, torch.ones(5 << 19, dtype=torch.bfloat16))
    assert "hg" in _vm_flags(part.data_ptr()) and "hg" not in _vm_flags(part.data_ptr() + part.nbytes - 1)
    small = host_copy(torch.ones(1000, dtype=torch.bfloat16))
    assert torch.equal(small, torch.ones(1000, dtype=torch.bfloat16))  # under one huge page: numpy's memory, the same bytes


def test_gpu_side_weight_on_the_cpu_keeps_no_view_of_the_checkpoint():
    t = torch.randn(256, 512).to(torch.bfloat16)
    for kw in (dict(bf16w=True), dict(), dict(int8=True)):
        w = gpu_side_weight("model.layers.0.self_attn.o_proj.weight", t, torch.device("cpu"), torch.float32, **kw)
        q = w[0] if isinstance(w, tuple) else w
        assert q.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    assert torch.equal(gpu_side_weight("model.layers.0.self_attn.o_proj.weight", t, torch.device("cpu"),
                                       torch.float32), t.float())
    from kernels_cpu.int8tiles import logical_shape, untile_into, usable
    from kernels_gpu.int8 import quantize_int8

    q, scale = gpu_side_weight("model.layers.0.self_attn.o_proj.weight", t, torch.device("cpu"), torch.float32,
                               int8=True)
    want_q, want_scale = quantize_int8(t)
    assert torch.equal(scale, want_scale) and logical_shape(q.numpy()) == (256, 512)
    if usable(256, 512):  # int8 codes on the CPU held as int8tiles' tiles: the same codes, untiled
        assert q.dim() == 4
        rows = np.empty((256, 512), np.int8)
        untile_into(q.numpy(), 0, rows)
        assert np.array_equal(rows, want_q.numpy())
    else:
        assert torch.equal(q, want_q)
    q16, _ = gpu_side_weight("model.layers.0.self_attn.o_proj.weight", t, torch.device("cpu"), torch.bfloat16,
                             int8=True)
    assert torch.equal(q16, want_q)  # bf16 math reads int8 codes through kernels_gpu.int8: rows, never tiles
    emb = gpu_side_weight("model.embed_tokens.weight", t, torch.device("cpu"), torch.float32)
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, t)
