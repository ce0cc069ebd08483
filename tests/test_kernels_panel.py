"""kernels_cpu.panel, the AVX2 prefill path (weights unpacked once per call into a panel, int32 sums over
whole groups), against the same fp32 reference as test_kernels_cpu and against the row kernel.

moe takes the panel path by itself only on ymm vectors without VNNI (the AVX2 subprocess of
test_kernels_cpu runs it that way); here moe.PANEL_MIN_TOKENS forces it, so it runs on any AVX2 CPU.
D and I are whole steps of 256 columns, so both projections go through it.
"""
from __future__ import annotations

import numpy as np
import pytest

from hybrid.checkpoint.int4 import dequantize_int4, pack_int4, quantize_int4
from kernels_cpu import ExpertTable, moe, moe_forward, panel
from kernels_cpu.actq import quantize_row_panel, quantize_rows
from tests.test_kernels_cpu import TOL, codes_in_column_order, make_experts, reference, rel_err

D, I, E, K = 512, 768, 5, 3


@pytest.fixture(scope="module")
def experts():
    return make_experts(seed=3, n=E, d=D, i=I)


@pytest.fixture(scope="module")
def table(experts):
    return ExpertTable.from_arrays(experts, D, I)


def skewed_routing(T: int, seed: int):
    """Expert 0 in most rows, expert 4 in two: slots from 1-2 tokens to nearly T, odd and even counts."""
    rng = np.random.default_rng(seed)
    ids = np.stack([np.zeros(T, np.int64), rng.integers(1, 4, T), rng.integers(1, 4, T)], 1)
    ids[[3, T - 2], 2] = 4
    w = rng.random((T, K)).astype(np.float32)
    w[rng.random((T, K)) < 0.1] = 0.0
    return ids, w


def test_panel_layout_holds_the_row_kernels_codes():
    """quantize_row_panel puts quantize_rows' codes, scales and offsets where panel.py's docstring says."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, D)).astype(np.float32)
    x[1, 64:96] = 0.0                                  # an all-zero group
    xa, dg, xs = np.empty((2, D), np.int16), np.empty((2, D // 32), np.float32), np.empty((2, D // 32), np.float32)
    quantize_rows(x, xa, dg, xs)
    q = codes_in_column_order(xa)
    for n in range(2):
        xp, dgp, xsp = np.empty(D, np.int16), np.empty(D // 32, np.float32), np.empty(D // 32, np.int32)
        quantize_row_panel(x[n], xp, dgp, xsp)
        for col in range(D):
            s, o = divmod(col, 256)
            p, h, v, e, k = o // 64, (o // 32) % 2, (o // 8) % 4, (o // 4) % 2, o % 4
            assert xp[256 * s + 64 * v + 16 * k + 2 * (4 * h + p) + e] == q[n, col]
        for g in range(D // 32):
            lane = 8 * (g // 8) + 4 * (g % 2) + (g % 8) // 2
            assert dgp[lane] == dg[n, g] and xsp[lane] == xs[n, g]


@pytest.mark.skipif(not panel.host_has_avx2(), reason="needs AVX2")
@pytest.mark.parametrize("T", [24, 7])
def test_moe_panel_path_agrees_with_the_row_kernel(T, experts, table, monkeypatch):
    """Every slot through the panel (threshold 1), none (no tiles either), and a mix (threshold 6): the
    int32 group sums are the same integers, so the outputs differ only by the order of the fp32 scaling
    (then a few intermediate codes move by one step, 2e-5 at most), and all hold 1e-4 to the reference."""
    ids, w = skewed_routing(T, seed=T)
    x = np.random.default_rng(T).standard_normal((T, D)).astype(np.float32)
    want = reference(x, ids, w, experts, D, I)
    monkeypatch.setattr(moe, "AMX_MIN_TOKENS", 10 ** 9)
    monkeypatch.setattr(moe, "PANEL_MIN_TOKENS", None)
    rows = moe_forward(x, ids, w, table)
    for threshold in (1, 6):
        monkeypatch.setattr(moe, "PANEL_MIN_TOKENS", threshold)
        got = moe_forward(x, ids, w, table)
        assert 0 < rel_err(got, rows) <= 2e-5             # not 0: the panel kernel did run
        assert rel_err(got, want) <= TOL
    assert rel_err(rows, want) <= TOL


@pytest.mark.skipif(not panel.host_has_avx2(), reason="needs AVX2")
@pytest.mark.parametrize("nrows,n", [(11, 5), (64, 9), (4, 1), (2, 2)])
def test_panel_rows_any_row_and_token_count(nrows, n):
    """Rows in threes with a last group of 4 or 2, tokens in pairs with a last one alone, rows of two
    panels and a part (2560 columns = 8 + 2 steps), tokens listed out of order, outputs in a strided
    view: against dequantised weights in float64."""
    din, rng = 2560, np.random.default_rng(nrows)
    packed, scale = quantize_int4(rng.standard_normal((nrows, din)).astype(np.float32))
    wdense = dequantize_int4(packed, scale, (nrows, din)).astype(np.float64)
    wb, sb = packed.view(np.uint8), np.ascontiguousarray(scale)
    x = rng.standard_normal((n + 3, din)).astype(np.float32)
    xp, dgp, xsp = np.empty((n + 3, din), np.int16), np.empty((n + 3, din // 32), np.float32), np.empty((n + 3, din // 32), np.int32)
    for t in range(n + 3):
        quantize_row_panel(x[t], xp[t], dgp[t], xsp[t])
    toks = rng.permutation(n + 3)[:n].astype(np.int64)
    out = np.full((n, nrows + 5), np.nan, np.float32)
    scratch = np.empty(panel.scratch_floats(n, nrows), np.float32)
    panel.panel_rows(wb.ctypes.data, wb.strides[0], sb.ctypes.data, sb.strides[0], nrows, din, xp, dgp, xsp,
                     toks.ctypes.data, n, scratch, out[:, 2:2 + nrows])
    want = x[toks].astype(np.float64) @ wdense.T
    assert rel_err(out[:, 2:2 + nrows], want) <= TOL
    assert np.isnan(out[:, :2]).all() and np.isnan(out[:, 2 + nrows:]).all()
