"""kernels_cpu.moe_forward against a slow reference: compressed-tensors dequantisation + fp32 matmuls.

Activations are quantised to int16 per group of 32 inside the kernels, so the tolerance is 1e-4
relative (Frobenius norm over the whole output). Shapes are small: D = 256 exercises the main loop
(8 groups a step), I = 384 also the one-chunk tail; qlen 128 over 6 experts every token-block size.
On an AVX-512 machine the whole file runs a second time in a subprocess that targets AVX2 only.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numba
import numpy as np
import pytest

from hybrid.checkpoint.int4 import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from kernels_cpu import ExpertTable, amx, int8gemm, membw, moe, moe_forward
from kernels_cpu.actq import CHUNK, QMAX, VNNI, quantize_rows
from kernels_cpu.membw import SHAPES, read_gbps_by_shape, read_lines
from kernels_cpu.simd import host_features
from kernels_cpu.table import PARTS, part_shapes

D, I, E, K = 256, 384, 6, 4
TOL = 1e-4


def make_experts(seed: int = 0, n: int = E, d: int = D, i: int = I) -> list[dict[str, np.ndarray]]:
    """Random experts quantised with hybrid.checkpoint.int4; ~3% of codes forced to -8 (nibble 0)."""
    rng = np.random.default_rng(seed)
    experts = []
    for _ in range(n):
        ex = {}
        for proj, shape in (("gate_proj", (i, d)), ("up_proj", (i, d)), ("down_proj", (d, i))):
            packed, scale = quantize_int4(rng.standard_normal(shape).astype(np.float32) * 0.05)
            q = unpack_int4(packed)
            q[rng.random(q.shape) < 0.03] = -8
            ex[f"{proj}.weight_packed"], ex[f"{proj}.weight_scale"] = pack_int4(q), scale
        experts.append(ex)
    return experts


def reference(x, ids, weights, experts, d: int = D, i: int = I):
    """fp32 reference: out[t] = sum_k w * down(silu(gate x) * up x), weights dequantised."""
    dense = [{p: dequantize_int4(ex[f"{p}.weight_packed"], ex[f"{p}.weight_scale"],
                                 (d, i) if p == "down_proj" else (i, d))
              for p in ("gate_proj", "up_proj", "down_proj")} for ex in experts]
    out = np.zeros((x.shape[0], d), np.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            d = dense[ids[t, k]]
            g, u = d["gate_proj"] @ x[t], d["up_proj"] @ x[t]
            out[t] += weights[t, k] * (d["down_proj"] @ (g / (1 + np.exp(-g)) * u))
    return out.astype(np.float32)


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def experts():
    return make_experts()


@pytest.fixture(scope="module")
def table(experts):
    return ExpertTable.from_arrays(experts, D, I)


def routing(T: int, seed: int):
    """ids with a repeated expert in every row and some zero weights."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, E, (T, K))
    ids[:, 1] = ids[:, 0]                              # repeats allowed
    w = rng.random((T, K)).astype(np.float32)
    w[rng.random((T, K)) < 0.2] = 0.0
    w[0, :] = [0.0, 0.5, 0.0, 0.25]
    return ids, w


def test_codes_include_minus_8(experts):
    assert (unpack_int4(experts[0]["gate_proj.weight_packed"]) == -8).any()
    assert (unpack_int4(experts[0]["down_proj.weight_packed"]) == -8).any()


@pytest.mark.parametrize("T", [1, 3, 16, 128])
def test_moe_matches_reference(T, experts, table):
    ids, w = routing(T, seed=T)
    x = np.random.default_rng(100 + T).standard_normal((T, D)).astype(np.float32)
    out = moe_forward(x, ids.astype(np.int32), w, table)
    assert out.dtype == np.float32 and out.shape == (T, D)
    assert rel_err(out, reference(x, ids, w, experts)) <= TOL


@pytest.mark.skipif(not amx.available(), reason="needs AMX tiles (Intel Sapphire Rapids and later) granted by Linux")
def test_moe_tile_kernel_agrees_with_row_kernel(experts, table, monkeypatch):
    """The same call with every expert through AMX's tile kernel and with none: the int32 group sums are
    the same exact integers, so gate and up differ only by the order of their fp32 scaling (~1e-7);
    SiLU(gate) * up is then requantised to int16, where such a difference moves a few codes by one
    step (3e-5 of their group's largest), hence 2e-5 at the output, well inside the 1e-4 both paths
    hold against the reference. 64 tokens over 6 experts: blocks of 16 tokens, a partial last one."""
    ids, w = routing(64, seed=11)
    x = np.random.default_rng(11).standard_normal((64, D)).astype(np.float32)
    monkeypatch.setattr(moe, "AMX_MIN_TOKENS", 1)
    tiles = moe_forward(x, ids, w, table)
    monkeypatch.setattr(moe, "AMX_MIN_TOKENS", 10 ** 9)
    rows = moe_forward(x, ids, w, table)
    assert 0 < rel_err(tiles, rows) <= 2e-5  # not 0: the tile kernel did run
    assert rel_err(tiles, reference(x, ids, w, experts)) <= TOL


def test_out_is_overwritten_and_threads_agree(table):
    ids, w = routing(16, seed=7)
    x = np.random.default_rng(7).standard_normal((16, D)).astype(np.float32)
    out = np.full((16, D), np.nan, np.float32)
    assert moe_forward(x, ids, w, table, out=out) is out
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        one = moe_forward(x, ids, w, table)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(out, one)            # the thread split never reorders sums


def test_zero_weights_and_empty(table):
    x = np.ones((2, D), np.float32)
    ids = np.zeros((2, K), np.int64)
    np.testing.assert_array_equal(moe_forward(x, ids, np.zeros((2, K), np.float32), table), 0)
    assert moe_forward(np.zeros((0, D), np.float32), ids[:0], np.zeros((0, K), np.float32),
                       table).shape == (0, D)


def test_from_arrays_places_each_part_at_its_offset(experts, table):
    shapes = part_shapes(D, I, 32)
    arena = table.arenas[0]
    for e, ex in enumerate(experts):
        for m, name in enumerate(PARTS):
            a, off = table.loc[e, m]
            assert a == 0 and off % 64 == 0
            raw = np.ascontiguousarray(ex[name]).view(np.uint8).reshape(-1)
            assert raw.size == shapes[m][0][0] * shapes[m][0][1] * shapes[m][1]
            np.testing.assert_array_equal(arena[off:off + raw.size], raw)


def test_table_over_memmap_with_unaligned_offsets(tmp_path, experts, table):
    """Two shard files, odd offsets (like safetensors' 8 + header bytes), reversed expert order."""
    loc = np.zeros((E, 6, 2), np.int64)
    files = [tmp_path / "a.bin", tmp_path / "b.bin"]
    blobs = [bytearray(b"\x07" * 13), bytearray(b"\x09" * 5)]
    for e in reversed(range(E)):
        f = e % 2
        for m, name in enumerate(PARTS):
            loc[e, m] = (f, len(blobs[f]))
            blobs[f] += np.ascontiguousarray(experts[e][name]).tobytes() + b"\x01" * 3
    for path, blob in zip(files, blobs):
        path.write_bytes(bytes(blob))
    mapped = ExpertTable([np.memmap(p, np.uint8, "r") for p in files], loc, D, I)
    ids, w = routing(16, seed=3)
    x = np.random.default_rng(3).standard_normal((16, D)).astype(np.float32)
    np.testing.assert_array_equal(moe_forward(x, ids, w, mapped), moe_forward(x, ids, w, table))


def _table_in_order(experts, order, split):
    """experts' parts laid out in `order` (indices into PARTS) with the alignment from_arrays uses; with
    split, up's two parts in an arena of their own."""
    loc = np.zeros((E, 6, 2), np.int64)
    blobs = [bytearray(), bytearray()]
    for e, ex in enumerate(experts):
        for m in order:
            a = 1 if split and m in (2, 3) else 0
            blobs[a] += b"\0" * (-len(blobs[a]) % 64)
            loc[e, m] = (a, len(blobs[a]))
            blobs[a] += np.ascontiguousarray(ex[PARTS[m]]).tobytes()
    return ExpertTable([np.frombuffer(bytes(b) or b"\0", np.uint8).copy() for b in blobs], loc, D, I)


def test_moe_one_token_gate_beside_up_wherever_they_lie(experts, table):
    """An expert with one token has its gate and up rows read side by side (the paired row kernel, the
    two matrices any distance apart, of either sign), and its down rows in pairs half a work item apart:
    the same output for up after gate, before it, or in another arena; bit for bit the two-token path's
    (each token given twice, so every expert has two, through the unpaired kernels); and the
    reference's within TOL."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((1, D)).astype(np.float32)
    ids = rng.choice(E, (1, K), replace=False)
    w = rng.random((1, K)).astype(np.float32)
    one = moe_forward(x, ids, w, table)
    assert rel_err(one, reference(x, ids, w, experts)) <= TOL
    for order, split in (((2, 3, 0, 1, 4, 5), False), ((0, 1, 2, 3, 4, 5), True), ((4, 2, 5, 3, 1, 0), True)):
        np.testing.assert_array_equal(moe_forward(x, ids, w, _table_in_order(experts, order, split)), one)
    twice = moe_forward(np.repeat(x, 2, 0), np.repeat(ids, 2, 0), np.repeat(w, 2, 0), table)
    np.testing.assert_array_equal(twice, np.repeat(one, 2, 0))


@pytest.mark.parametrize("T", [1, 3, 16])
def test_moe_down_by_expert_or_by_rows_agree_bit_for_bit(T, experts, table, monkeypatch):
    """The down projection an expert at a time with each pair's rows kept apart (SPLIT_PAIRS, decode)
    and a block of rows across every expert at a time (prompts) sum each output in the same order: the
    same bits, with repeated experts and zero weights (routing), on every kernel the tokens take."""
    ids, w = routing(T, seed=40 + T)
    x = np.random.default_rng(40 + T).standard_normal((T, D)).astype(np.float32)
    monkeypatch.setattr(moe, "SPLIT_PAIRS", 10 ** 9)
    split = moe_forward(x, ids, w, table)
    monkeypatch.setattr(moe, "SPLIT_PAIRS", -1)
    np.testing.assert_array_equal(moe_forward(x, ids, w, table), split)
    assert rel_err(split, reference(x, ids, w, experts)) <= TOL


def test_loc_updated_in_place_is_followed(experts):
    tab = ExpertTable.from_arrays(experts, D, I)
    ids, w = routing(3, seed=5)
    x = np.random.default_rng(5).standard_normal((3, D)).astype(np.float32)
    ref = moe_forward(x, ids, w, tab)
    tab.loc[[0, 1]] = tab.loc[[1, 0]]                  # a cache slot refill swaps two experts
    swapped = np.where(ids == 0, 1, np.where(ids == 1, 0, ids))
    np.testing.assert_array_equal(moe_forward(x, swapped, w, tab), ref)


def test_validation(experts, table):
    x = np.zeros((1, D), np.float32)
    w = np.ones((1, K), np.float32)
    with pytest.raises(ValueError, match="expert ids"):
        moe_forward(x, np.full((1, K), E), w, table)
    with pytest.raises(ValueError, match="expert ids"):
        moe_forward(x, np.full((1, K), -1), w, table)
    bad = ExpertTable.from_arrays(experts[:2], D, I)
    bad.loc[1, 3, 0] = 1  # a refill naming an arena that does not exist
    with pytest.raises(ValueError, match="names an arena"):
        moe_forward(x, np.ones((1, K), np.int64), w, bad)
    bad.loc[1, 3] = (0, bad.arenas[0].shape[0] - 1)  # a part running past its arena's end
    with pytest.raises(ValueError, match="expert 1 up_proj.weight_scale: bytes .* outside arena 0"):
        moe_forward(x, np.ones((1, K), np.int64), w, bad)
    moe_forward(x, np.zeros((1, K), np.int64), w, bad)  # expert 0 is still whole
    with pytest.raises(ValueError, match=r"x must be"):
        moe_forward(np.zeros((1, D + 1), np.float32), np.zeros((1, K), np.int64), w, table)
    with pytest.raises(ValueError, match="out must be"):
        moe_forward(x, np.zeros((1, K), np.int64), w, table, out=np.zeros((1, D), np.float64))
    short = ExpertTable.from_arrays(experts[:1], D, I)
    with pytest.raises(ValueError, match="outside arena"):
        ExpertTable([short.arenas[0][:-1]], short.loc, D, I)
    with pytest.raises(ValueError, match="multiples of 128"):
        ExpertTable(table.arenas, table.loc, D, 192)


def codes_in_column_order(xa: np.ndarray) -> np.ndarray:
    """actq's int16 activation codes [N, din], laid out as kernels_cpu/simd.py documents, back in column
    order (int64): vpmaddwd's chunk-transposed int16, or vpdpbusd's two signed bytes a = 256 h + l."""
    col = np.arange(xa.shape[1])
    c, j = col // CHUNK, col % CHUNK
    if not VNNI:
        return xa[:, c * CHUNK + (j % 4) * (CHUNK // 4) + j // 4].astype(np.int64)
    b = xa.view(np.int8).astype(np.int64)
    hi = 2 * c * CHUNK + (j % 2) * (CHUNK // 2) + j // 2   # h: even columns, then odd; l: the same after
    return 256 * b[:, hi] + b[:, hi + CHUNK]


def test_activation_layout_round_trips():
    """Codes in the layout of the kernel this CPU runs (both layouts run here, see the subprocess tests):
    each group's largest value takes the largest code, every code within half a step of x."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 384)).astype(np.float32)
    x[1, :32] = 0.0                                    # an all-zero group
    x[2, 40] = -50.0                                   # a group whose largest value is negative
    xa = np.empty((3, 384), np.int16)
    dg = np.empty((3, 12), np.float32)
    xs = np.empty((3, 12), np.float32)
    quantize_rows(x, xa, dg, xs)
    q = codes_in_column_order(xa)
    assert QMAX == (32639 if VNNI else 32767)
    assert np.abs(q).max() == QMAX and q[2, 40] == -QMAX and (q[1, :32] == 0).all()
    step = np.repeat(dg, 32, axis=1).astype(np.float64)
    assert (np.abs(q * step - x) <= 0.5001 * step).all()
    np.testing.assert_array_equal(xs, -8 * q.reshape(3, 12, 32).sum(-1))


def test_runs_beside_python_threads(experts, table):
    """nogil: two Python threads calling at once both get the right answer."""
    ids, w = routing(16, seed=11)
    x = np.random.default_rng(11).standard_normal((16, D)).astype(np.float32)
    want = moe_forward(x, ids, w, table)
    got = []
    ts = [threading.Thread(target=lambda: got.append(moe_forward(x, ids, w, table))) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(got) == 2 and all(np.array_equal(g, want) for g in got)


# ---- bf16 weights under fp32 activations (kernels_cpu.widen) -------------------------------------

def bf16_bits(a: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), rounded to nearest even, as torch stores bf16."""
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


# I not a multiple of any vector width: Numba's loop, rows one at a time (<= SHORT_ROW_BYTES) and four at a
# time; whole steps of bf16dot.PAIR: bf16dot.row_dot, short rows and long
@pytest.mark.parametrize("In", [333, 2053, 96, 4128])
def test_bf16_gemv_equals_the_widened_fp32_product(In):
    """Every row count the GEMV takes, O past several work items with a partial last one; the reference
    widens the same bits in float64."""
    from kernels_cpu import bf16dot
    from kernels_cpu.widen import MAX_ROWS, RB, SHORT_ROW_BYTES, bf16_gemv

    assert (2 * In <= SHORT_ROW_BYTES) == (In in (333, 96)) and bf16dot.fits(In) == (In in (96, 4128))
    rng = np.random.default_rng(7)
    O = 5 * RB + 3
    w = bf16_bits(rng.standard_normal((O, In)) * np.logspace(-3, 1, O)[:, None])
    wf = (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    for T in range(1, MAX_ROWS + 1):
        x = rng.standard_normal((T, In)).astype(np.float32)
        y = bf16_gemv(x, w)
        ref = x.astype(np.float64) @ wf.T
        assert y.dtype == np.float32 and y.shape == (T, O)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    out = np.full((1, O), np.nan, np.float32)  # out is written whole
    assert bf16_gemv(x[:1], w, out) is out and np.isfinite(out).all()
    with pytest.raises(ValueError, match="out must be"):  # the kernel writes without bounds checks
        bf16_gemv(x[:2], w, out)
    x[0, 5] = np.nan  # NaN is not optimised away (no fast-math 'nnan')
    assert np.isnan(bf16_gemv(x[:1], w)).all()
    with pytest.raises(ValueError, match="T <= 8"):
        bf16_gemv(np.zeros((MAX_ROWS + 1, In), np.float32), w)
    with pytest.raises(ValueError, match="uint16"):
        bf16_gemv(np.zeros((1, In), np.float32), w.astype(np.int32))


def test_bf16dot_deinterleaves_each_step_into_even_then_odd_columns():
    """The activation layout row_dot reads: per PAIR columns, the LANES even ones, then the odd ones."""
    from kernels_cpu.bf16dot import LANES, PAIR, deinterleave

    assert PAIR == 2 * LANES and LANES in (8, 16)
    x = np.arange(2 * 3 * PAIR, dtype=np.float32).reshape(2, 3 * PAIR)
    xd = np.empty_like(x)
    deinterleave(x, xd)
    steps = x.reshape(2, 3, LANES, 2)  # [T, step, lane, even/odd]
    np.testing.assert_array_equal(xd, np.concatenate([steps[..., 0], steps[..., 1]], axis=2).reshape(2, -1))


def _int8_rows(rng, In):
    """-> O rows (three work items and a partial one), int8 codes [O, In] with both extremes, their
    bf16 row scales (bits) and those scales as float64."""
    from kernels_cpu.widen import RB

    O = 3 * RB + 5
    q = rng.integers(-127, 128, (O, In), dtype=np.int64).astype(np.int8)
    q[0, :3] = (-127, 127, 0)
    scale = bf16_bits(np.logspace(-4, 0, O))
    return O, q, scale, (scale.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("In", [301, 4099])  # short rows and long ones (SHORT_ROW_BYTES)
def test_int8_gemv_equals_the_scaled_int8_product(In):
    """int8 codes (both extremes present) with a bf16 scale per row, every row count, against float64."""
    from kernels_cpu.widen import MAX_ROWS, SHORT_ROW_BYTES, int8_gemv

    assert (In <= SHORT_ROW_BYTES) == (In == 301)
    rng = np.random.default_rng(8)
    O, q, scale, sf = _int8_rows(rng, In)
    for T in range(1, MAX_ROWS + 1):
        x = rng.standard_normal((T, In)).astype(np.float32)
        ref = x.astype(np.float64) @ (q.astype(np.float64) * sf[:, None]).T
        np.testing.assert_allclose(int8_gemv(x, q, scale), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(ValueError, match="scale"):
        int8_gemv(x, q, scale[:-1])
    with pytest.raises(ValueError, match="q must be int8"):
        int8_gemv(x, q.astype(np.int16), scale)


def _int16_blocks(x):
    """int8dot.quantize_blocks, independently in numpy: per 128 columns xs = max |x| / 32767 in fp32,
    xq = x * (1 / xs) rounded half to even, clipped to +-32767."""
    from kernels_cpu.int8dot import BLOCK

    xb = x.reshape(x.shape[0], -1, BLOCK)
    m = np.abs(xb).max(-1)
    xs = np.where(m > 0, m / np.float32(32767), np.float32(1)).astype(np.float32)
    xq = np.clip(np.rint(xb * (np.float32(1) / xs)[..., None]), -32767, 32767)
    return xq, xs


def test_int16_activation_codes_equal_the_numpy_rule():
    """int8dot.quantize_blocks, the int8 GEMV's activations: codes and scales exactly _int16_blocks' on
    blocks that are random, all zero, all -0.0, tiny, huge, a negative largest value, and with codes on
    half steps (rounded to even); a NaN leaves the rest of its block's codes as they were without it."""
    from kernels_cpu.int8dot import quantize_blocks

    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, 8 * 128)).astype(np.float32)
    x[0, :128] = 0
    x[0, 128:256] = -0.0
    x[1, :128] *= np.float32(1e-30)
    x[1, 128:256] *= np.float32(1e30)
    x[2, :128] = 0
    x[2, :7] = (32767.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5)  # scale 1: codes on half steps round to even
    x[2, 128] = -200.0  # its block's largest is negative
    x[0, 300] = 0.0  # not its block's largest (a NaN goes here below)
    xq, xs = np.empty(x.shape, np.int16), np.empty((3, 8), np.float32)
    quantize_blocks(x, xq, xs)
    want_q, want_s = _int16_blocks(x)
    np.testing.assert_array_equal(xq, want_q.reshape(xq.shape))
    np.testing.assert_array_equal(xs.view(np.uint32), want_s.view(np.uint32))
    y = x.copy()
    y[0, 300] = np.nan
    yq, ys = np.empty_like(xq), np.empty_like(xs)
    quantize_blocks(y, yq, ys)
    keep = np.ones(x.shape, bool)
    keep[0, 300] = False
    assert ys[0, 2] == xs[0, 2] and (yq[keep] == xq[keep]).all()


@pytest.mark.skipif(not host_features()["avx2"], reason="the vpmaddwd path needs AVX2")
@pytest.mark.parametrize("In", [256, 33 * 128])  # short rows and long ones (SHORT_ROW_BYTES)
def test_int8_gemv_over_int16_activation_blocks(In):
    """Input widths that are a multiple of int8dot.BLOCK take the vpmaddwd path: int8 codes against
    int16 activations with a scale per 128 columns. Exactly that math (float64 over the same codes),
    every row count and partial work item, one token's rows (read one at a time) the same bits as in a
    block of tokens; and off the fp32-activation product by at most the codes'
    rounding (half a step each)."""
    from kernels_cpu.widen import MAX_ROWS, RB, SHORT_ROW_BYTES, _int8_fast, gemv_pair, int8_gemv

    assert (In <= SHORT_ROW_BYTES) == (In == 256)
    rng = np.random.default_rng(11)
    O, q, scale, sf = _int8_rows(rng, In)
    for T in range(1, MAX_ROWS + 1):
        x = rng.standard_normal((T, In)).astype(np.float32)
        x[0, 128:256] = 0  # an all-zero block
        x[-1, 5] = 40.0  # an outlier: its block's other values get coarser codes
        assert _int8_fast(x, q)
        xq, xs = _int16_blocks(x)
        exact = np.einsum("tbi,obi,tb->to", xq, q.astype(np.float64).reshape(O, -1, 128), xs) * sf
        got = int8_gemv(x, q, scale)
        np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())
        full = x.astype(np.float64) @ (q.astype(np.float64) * sf[:, None]).T  # fp32 activations
        half_steps = 0.5 * np.einsum("tb,obi->to", xs, np.abs(q.astype(np.float64)).reshape(O, -1, 128)) * sf
        assert (np.abs(got - full) <= half_steps + 1e-6 * np.abs(full).max()).all()  # each code off <= half a step
        if T > 1:  # one token reads a row at a time, more tokens blocks of rows: each row's sums in one order
            np.testing.assert_array_equal(int8_gemv(x[-1:], q, scale).view(np.uint32), got[-1:].view(np.uint32))
        a, b = gemv_pair(x, q, scale, q[:RB + 3], scale[:RB + 3])
        np.testing.assert_array_equal(a, got)
        np.testing.assert_array_equal(b, got[:, :RB + 3])


@pytest.mark.skipif(not int8gemm.available(), reason="int8gemm's tiles are for ymm vectors without VNNI "
                                                    "(the AVX2 run of this file takes them)")
def test_int8_prompt_gemm_equals_the_int8_gemv_bit_for_bit(monkeypatch):
    """kernels_cpu.int8gemm, a prompt's int8 product on AVX2: every output the int8 GEMV's bit for bit
    (the same activation codes, block sums and lane order) over whole and partial tiles, two token
    chunks and two work items, and exactly the int16-block math against float64; the engine's linear
    takes it for a prompt's rows; a wrong shape is refused by name."""
    import torch

    from hybrid.model import linear as lin
    from kernels_cpu.widen import MAX_ROWS, int8_gemv

    rng = np.random.default_rng(12)
    O, q, scale, sf = _int8_rows(rng, 3 * 128)
    assert O % int8gemm.ROWS and O > int8gemm.RB
    T = int8gemm.TB + int8gemm.TOKENS + 3  # a second chunk of tokens: one whole tile and three alone
    x = rng.standard_normal((T, 3 * 128)).astype(np.float32)
    x[0, 128:256] = 0  # an all-zero block
    x[-1, 5] = 40.0  # an outlier
    got = int8gemm.int8_gemm(x, q, scale, numba.get_num_threads())
    gemv = np.concatenate([int8_gemv(x[t:t + MAX_ROWS], q, scale) for t in range(0, T, MAX_ROWS)])
    np.testing.assert_array_equal(got.view(np.uint32), gemv.view(np.uint32))
    xq, xs = _int16_blocks(x)
    exact = np.einsum("tbi,obi,tb->to", xq, q.astype(np.float64).reshape(O, -1, 128), xs) * sf
    np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())
    w = (torch.from_numpy(q), torch.from_numpy(scale.view(np.int16)).view(torch.bfloat16))
    y = lin.linear(torch.from_numpy(x), w)
    np.testing.assert_array_equal(y.numpy().view(np.uint32), gemv.view(np.uint32))
    with pytest.raises(ValueError, match="int8_gemm: want .* multiple of 128"):
        int8gemm.int8_gemm(x[:, :-1].copy(), q[:, :-1].copy(), scale, 1)
    calls = []  # past MAX_ROWS rows the dequantised fp32 GEMM takes the prompt
    monkeypatch.setattr(int8gemm, "int8_gemm", lambda *a: calls.append(len(a[0])) or np.zeros((len(a[0]), O)))
    for rows in (int8gemm.MAX_ROWS, int8gemm.MAX_ROWS + 1):
        lin.linear(torch.zeros(rows, x.shape[1]), w)
    assert calls == [int8gemm.MAX_ROWS]


@pytest.mark.parametrize("path", ["amx", "int8gemm", "fp32"])
def test_linear_over_int8_tiles_equals_the_rows(monkeypatch, path):
    """model/linear.py's int8 products over codes held as int8tiles' tiles (int8w on the CPU): a prompt's rows
    through each path a CPU may take (AMX's tiles reading the tiles, int8gemm over blocks of rows untiled in
    turn, the fp32 GEMM over blocks dequantised from the tiles) give the row-major codes' outputs bit for bit;
    a decode step's rows are the tile GEMV's, within fp32 summation order of the row GEMV's."""
    import torch

    from hybrid.model import linear as lin
    from kernels_cpu.int8tiles import TILE_COLS, int8_gemv_tiles, tile_rows
    from kernels_cpu.simd import host_has_avx2
    from kernels_cpu.widen import MAX_ROWS

    if not host_has_avx2():
        pytest.skip("int8 tiles are AVX2 code")
    if path == "amx" and not amx.available(bf16=True):
        pytest.skip("no AMX-BF16 on this CPU")
    if path != "amx":
        monkeypatch.setattr(lin, "_tiles_take", lambda w: False)
    monkeypatch.setattr(int8gemm, "available", lambda: path == "int8gemm")
    rng = np.random.default_rng(13)
    O, I = 160, 2 * TILE_COLS
    q = rng.integers(-127, 128, (O, I), dtype=np.int64).astype(np.int8)
    scale = bf16_bits(rng.uniform(0.001, 0.01, O))
    sc = torch.from_numpy(scale.view(np.int16)).view(torch.bfloat16)
    rows, tiles = (torch.from_numpy(q), sc), (torch.from_numpy(tile_rows(q)), sc)
    x = torch.from_numpy(rng.standard_normal((40, I)).astype(np.float32))
    want = lin.linear(x, rows).numpy()
    np.testing.assert_array_equal(lin.linear(x, tiles).numpy().view(np.uint32), want.view(np.uint32))
    monkeypatch.setattr(lin, "UNTILE_BYTES", 64 * I)  # blocks of 64 rows, the last part (untiled paths)
    np.testing.assert_array_equal(lin.linear(x, tiles).numpy().view(np.uint32), want.view(np.uint32))
    for T in (1, MAX_ROWS):
        one = lin.linear(x[:T], tiles).numpy()
        np.testing.assert_array_equal(one, int8_gemv_tiles(x[:T].numpy(), tiles[0].numpy(), scale))
        np.testing.assert_allclose(one, lin.linear(x[:T], rows).numpy(), rtol=1e-5, atol=1e-5 * np.abs(one).max())


def _mlp_ref(x, wg, wu, wd):
    """SwiGLU in float64 over already-widened weights."""
    g, u = x.astype(np.float64) @ wg.T, x.astype(np.float64) @ wu.T
    return (g / (1 + np.exp(-g)) * u) @ wd.T


@pytest.mark.parametrize("kind,odd", [("bf16", True), ("bf16", False), ("int8", True)])
def test_fused_gemvs_equal_the_float64_products(kind, odd):
    """gemv_pair and swiglu_gemv (one parallel region per product instead of a call each) against
    float64, for bf16 weights and for int8 codes with bf16 row scales; shapes with partial work items,
    widths that are no multiple of a vector (odd) or that bf16dot.row_dot takes (bf16, not odd)."""
    from kernels_cpu import bf16dot
    from kernels_cpu.widen import MAX_ROWS, RB, gemv_pair, swiglu_gemv

    rng = np.random.default_rng(9)
    # gate, up: long rows; down: short ones (SHORT_ROW_BYTES)
    D, I, O2 = (3 * RB + 5 + 2048, 2 * RB + 7, RB - 3) if odd else (2112, 64, RB - 3)
    assert bf16dot.fits(D) == bf16dot.fits(I) == (not odd)

    def weight(o, i):  # -> (stored array, scales, float64 value)
        if kind == "bf16":
            w = bf16_bits(rng.standard_normal((o, i)) / np.sqrt(i))
            return w, np.empty(0, np.uint16), (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        q = rng.integers(-127, 128, (o, i), dtype=np.int64).astype(np.int8)
        s = bf16_bits(np.full(o, 1 / (64 * np.sqrt(i))))
        return q, s, q.astype(np.float64) * (s.astype(np.uint32) << 16).view(np.float32).astype(np.float64)[:, None]

    (wg, sg, fg), (wu, su, fu), (wd, sd, fd), (w2, s2, f2) = weight(I, D), weight(I, D), weight(D, I), weight(O2, D)
    for T in (1, 3, MAX_ROWS):
        x = rng.standard_normal((T, D)).astype(np.float32)
        ref = _mlp_ref(x, fg, fu, fd)
        np.testing.assert_allclose(swiglu_gemv(x, wg, sg, wu, su, wd, sd), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        y1, y2 = gemv_pair(x, wg, sg, w2, s2)
        for y, f in ((y1, fg), (y2, f2)):
            r = x.astype(np.float64) @ f.T
            np.testing.assert_allclose(y, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
    with pytest.raises(ValueError, match="one MLP"):
        swiglu_gemv(x, wg, sg, wu, su, wd[:, :-1].copy(), sd)
    with pytest.raises(ValueError, match="all bf16 bits"):
        gemv_pair(x, wg, sg, w2.view(np.uint8) if kind == "int8" else w2.astype(np.int8), s2)
    with pytest.raises(ValueError, match="T <= 8"):
        gemv_pair(np.zeros((MAX_ROWS + 1, D), np.float32), wg, sg, w2, s2)


def test_fused_products_in_the_model_equal_the_separate_ones():
    """hybrid.model.linear's swiglu / linear_pair take the fused kernels for a decode step on the CPU and
    the separate products for a prompt; both give the same numbers (bf16 and int8 weights)."""
    import torch

    from hybrid.model.linear import linear, linear_pair, swiglu
    from kernels_gpu.int8 import quantize_int8

    g = torch.Generator().manual_seed(3)
    D, I = 256, 384
    ws = [torch.randn(o, i, generator=g).div(i ** 0.5).to(torch.bfloat16) for o, i in ((I, D), (I, D), (D, I))]
    for weights in (ws, [quantize_int8(w) for w in ws]):
        for T in (1, 5, 20):  # 20 rows: past the GEMV, the blocked GEMM path
            x = torch.randn(T, D, generator=g)
            want = linear(torch.nn.functional.silu(linear(x, weights[0])) * linear(x, weights[1]), weights[2])
            torch.testing.assert_close(swiglu(x, *weights), want, rtol=1e-5, atol=1e-5)
            a, b = linear_pair(x, weights[0], weights[1])
            torch.testing.assert_close(a, linear(x, weights[0]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b, linear(x, weights[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gemm", ["_onednn_block", "_mkl_block"])
def test_prompt_products_equal_the_float64_ones(gemm, monkeypatch):
    """Past the GEMV's rows, linear widens blocks of weight rows to fp32 and multiplies each with the
    chosen block GEMM (oneDNN's or MKL's): every block, the partial last one too, holds the fp32 product
    of the stored bf16 / int8 weights, for a prompt of 20 rows and one of 129."""
    import torch

    from hybrid.model import linear as lin
    from kernels_gpu.int8 import quantize_int8

    monkeypatch.setattr(lin, "_GEMM", [getattr(lin, gemm)])
    monkeypatch.setattr(lin, "ONEDNN_BLOCK_ROWS", 64)
    monkeypatch.setattr(lin, "WIDEN_BLOCK_ROWS", 96)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3 * 96 + 17, 200, generator=g).div(200 ** 0.5).to(torch.bfloat16)
    q, s = quantize_int8(w)
    for values in (64 * 200, 80 * 200 + 7):  # oneDNN's blocks of 64 rows, then 80 (short rows take more)
        monkeypatch.setattr(lin, "ONEDNN_BLOCK_VALUES", values)
        for T in (20, 129):
            x = torch.randn(T, 200, generator=g)
            for weight, wd in ((w, w.double()), ((q, s), q.double() * s.double()[:, None])):
                ref = x.double() @ wd.T
                y = lin.linear(x, weight)
                assert y.dtype == torch.float32 and y.shape == (T, w.shape[0])
                torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("parallel", [True, False])
def test_dequantized_int8_rows_equal_torchs_widen_then_scale(parallel):
    """int8dot.dequantize_rows, a prompt's int8 block before its GEMM: bit for bit the fp32 values of
    torch's int8 -> fp32 copy times the row's scale, for any block of rows of the weight; a wrong
    dtype or shape is refused by name."""
    import torch

    from kernels_cpu.int8dot import dequantize_rows
    from kernels_gpu.int8 import quantize_int8

    g = torch.Generator().manual_seed(9)
    q, s = quantize_int8(torch.randn(70, 333, generator=g).to(torch.bfloat16))
    s32 = s.float()
    for o, n in ((0, 70), (13, 1), (64, 6)):
        out = np.full((n, 333), np.nan, np.float32)
        dequantize_rows(q.numpy()[o:o + n], s32.numpy()[o:o + n], out, parallel)
        want = q[o:o + n].float() * s32[o:o + n, None]
        np.testing.assert_array_equal(out.view(np.uint32), want.numpy().view(np.uint32))
    with pytest.raises(ValueError, match="dequantize_rows.*scale float32"):
        dequantize_rows(q.numpy(), s.view(torch.int16).numpy(), np.empty((70, 333), np.float32), parallel)
    with pytest.raises(ValueError, match="dequantize_rows.*out"):
        dequantize_rows(q.numpy(), s32.numpy(), np.empty((70, 332), np.float32), parallel)


def test_prompt_gemm_choice(monkeypatch):
    """oneDNN's linear is taken where it gives fp32 products (every torch CPU build this project
    installs has it); KIMI_HYBRID_CPU_GEMM=mkl takes torch.mm."""
    import torch

    from hybrid.model import linear as lin

    monkeypatch.setattr(lin, "_GEMM", [])
    assert lin._block_gemm() is (lin._onednn_block if torch.backends.mkldnn.is_available() else lin._mkl_block)
    monkeypatch.setattr(lin, "_GEMM", [])
    monkeypatch.setenv("KIMI_HYBRID_CPU_GEMM", "mkl")
    assert lin._block_gemm() is lin._mkl_block


@pytest.mark.parametrize("int8", [False, True])
def test_bf16_prompt_math_rounds_the_activations_and_nothing_else(int8):
    """Under prompt_math('bf16') a prompt's products are those of the bf16-rounded activations with
    the weights as held (int8 codes exact in bf16, times their row scales), sums rounded to bf16; a
    decode step's rows and the router's fp32 product stay exact fp32; 'fp32' is the widened product."""
    import torch

    from hybrid.model import linear as lin

    g = torch.Generator().manual_seed(13)
    x = torch.randn(20, 96, generator=g)
    if int8:
        q = torch.randint(-127, 128, (1100, 96), generator=g, dtype=torch.int8)  # > WIDEN_BLOCK_ROWS: two blocks
        s = (torch.rand(1100, generator=g) * 0.02 + 0.001).bfloat16()
        w, w64 = (q, s), q.double() * s.double()[:, None]
    else:
        w = torch.randn(1100, 96, generator=g).bfloat16()
        w64 = w.double()
    exact = x.double() @ w64.T  # the fp32 path's product
    rounded = x.bfloat16().double() @ w64.T  # the bf16 path's, before its output rounding
    scale = exact.abs().max().item()
    torch.testing.assert_close(lin.linear(x, w).double(), exact, rtol=1e-5, atol=1e-5 * scale)
    with lin.prompt_math("bf16"):
        got = lin.linear(x, w).double()
        torch.testing.assert_close(lin.linear(x[:8], w).double(), exact[:8], rtol=1e-5, atol=1e-5 * scale)
        if not int8:
            torch.testing.assert_close(lin.fp32_linear(x, w).double(), exact, rtol=1e-5, atol=1e-5 * scale)
    assert got.dtype == torch.float64 and got.shape == (20, 1100)
    torch.testing.assert_close(got, rounded, rtol=2 ** -7, atol=2 ** -7 * scale)  # one bf16 rounding of the sum
    assert (got - exact).abs().max().item() > 1e-4 * scale  # the activations were rounded: not the fp32 path
    with pytest.raises(ValueError, match="prompt math must be one of fp32, bf16"):
        with lin.prompt_math("fp16"):
            pass


def test_bf16_prompt_math_refused_where_it_does_not_apply(monkeypatch):
    import torch

    from hybrid.model.linear import check_prompt_math

    check_prompt_math("fp32", "cuda")
    with pytest.raises(ValueError, match="for a GPU side on the CPU"):
        check_prompt_math("bf16", "cuda")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(ValueError, match="needs a CPU with AVX512_BF16 or AMX"):
        check_prompt_math("bf16", "cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    check_prompt_math("bf16", "cpu")


def test_bf16_gemv_beside_the_expert_kernels(experts, table):
    """The engine's decode runs the GEMVs on the forward pass's thread while a worker runs moe_forward:
    every answer stays exact with the two parallel regions at once."""
    from kernels_cpu.widen import bf16_gemv, int8_gemv

    rng = np.random.default_rng(12)
    ids, wts = routing(16, seed=12)
    x = rng.standard_normal((16, D)).astype(np.float32)
    w = bf16_bits(rng.standard_normal((300, D)))
    q, qs = rng.integers(-127, 128, (300, D)).astype(np.int8), bf16_bits(np.full(300, 0.01))
    want_moe, want_gemv, want_int8 = moe_forward(x, ids, wts, table), bf16_gemv(x[:4], w), int8_gemv(x[:4], q, qs)
    got = {"moe": [], "gemv": [], "int8": []}

    def experts_loop():
        for _ in range(20):
            got["moe"].append(moe_forward(x, ids, wts, table))

    t = threading.Thread(target=experts_loop)
    t.start()
    for _ in range(100):
        got["gemv"].append(bf16_gemv(x[:4], w))
        got["int8"].append(int8_gemv(x[:4], q, qs))
    t.join()
    assert all(np.array_equal(g, want_moe) for g in got["moe"]) and len(got["moe"]) == 20
    assert all(np.array_equal(g, want_gemv) for g in got["gemv"])
    assert all(np.array_equal(g, want_int8) for g in got["int8"])


def test_decode_under_numbas_workqueue_layer_does_not_abort(tiny_path):
    """Where neither OpenMP nor TBB is installed Numba falls back to its workqueue layer, which aborts
    the process when two threads enter parallel regions at once: the GEMV then runs on one core."""
    code = ("import hybrid, torch; from kernels_cpu.widen import concurrent_parallel_ok\n"
            "toks = []\n"
            "for p in ('auto', 'int8'):  # bf16 and int8 weights: both GEMVs\n"
            f"    e = hybrid.load({str(tiny_path)!r}, backend='numba', device='cpu', context=64, gpu_precision=p)\n"
            "    toks += [s.token for s in e.generate([1, 2, 3, 4], 6, temperature=0)]\n"
            "print(toks, concurrent_parallel_ok())")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, NUMBA_THREADING_LAYER=layer),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for layer in ("workqueue", "default")]  # side by side: each mostly compiles on one core
    runs = [(p, *p.communicate(timeout=300)) for p in procs]
    assert all(p.returncode == 0 for p, _, _ in runs), [err[-2000:] for _, _, err in runs]
    (toks_wq, ok_wq), (toks, ok) = (out.strip().rsplit(" ", 1) for _, out, _ in runs)
    assert ok_wq == "False" and toks_wq == toks  # the same greedy tokens on one core


HASWELL = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fsgsbase,+lzcnt,+mmx,+movbe,+pclmul,"
           "+popcnt,+rdrnd,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt")
_SUBPROCESS = os.environ.get("NUMBA_CPU_FEATURES") is not None
# the tests that run the INT4 row kernels and their activation layout, and the int8 GEMV's vpdpbusd or
# vpmaddwd path
_MOE_TESTS = "moe or activation_layout or overwritten or zero_weights or memmap or python_threads or int8_gemv"


def _host_features_without(*prefixes: str) -> str:
    import llvmlite.binding as llvm_binding

    feats = llvm_binding.get_host_cpu_features()
    for f in list(feats):
        if f.startswith(prefixes):
            feats[f] = False
    return feats.flatten()


# test name -> (numba CPU name, its features, the tests of this file it runs); features are computed
# when the runs start, so collecting this file on any CPU costs nothing
_ISA_RUNS = {
    "test_avx2_kernels_in_a_subprocess": ("haswell", lambda: HASWELL, "not nothing"),
    "test_avx2_vnni_kernels_in_a_subprocess": ("haswell", lambda: HASWELL + ",+avxvnni", _MOE_TESTS),
    "test_avx512_kernels_without_vnni_in_a_subprocess":
        ("skylake-avx512", lambda: _host_features_without("avx512vnni", "avxvnni"), _MOE_TESTS),
    "test_zmm_vnni_kernels_without_amx_in_a_subprocess":
        ("icelake-server", lambda: _host_features_without("amx"), _MOE_TESTS),
}


@pytest.fixture(scope="module", autouse=True)
def isa_runs(request, tmp_path_factory):
    """Every ISA run this session selected, started together when this file's first test starts: each
    is mostly one core compiling the kernels for its target, as are this file's own tests, so side by
    side they keep both cores of a 2-core machine busy where one after another they kept one. Yields
    name -> (process, log path); any still running at the module's end is killed."""
    chosen = {item.name for item in request.session.items if item.name in _ISA_RUNS
              and not item.get_closest_marker("skipif").args[0]}
    logs = tmp_path_factory.mktemp("isa")
    here = Path(__file__)
    runs = {}
    for name in sorted(chosen):
        cpu, features, select = _ISA_RUNS[name]
        env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features())
        log = logs / f"{name}.log"
        with open(log, "w") as out:
            runs[name] = (subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here),
                                            "-k", select + " and not in_a_subprocess"],
                                           cwd=here.parents[1], env=env, stdout=out, stderr=subprocess.STDOUT), log)
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _passes(isa_runs, name: str) -> None:
    """The run of this file under the ISA of test `name` ended with every selected test passing."""
    proc, log = isa_runs[name]
    code = proc.wait(timeout=600)
    assert code == 0, log.read_text()[-6000:]   # 5 would mean no test ran


@pytest.mark.skipif(not host_features()["avx512bw"] or _SUBPROCESS, reason="this process already runs the AVX2 kernels")
def test_avx2_kernels_in_a_subprocess(isa_runs):
    """The ymm (AVX2) kernels, compiled for a Haswell target (vpmaddwd, as on Zen 3), pass this whole file too."""
    _passes(isa_runs, "test_avx2_kernels_in_a_subprocess")


@pytest.mark.skipif(not host_features()["avxvnni"] or _SUBPROCESS, reason="needs a CPU with AVX-VNNI")
def test_avx2_vnni_kernels_in_a_subprocess(isa_runs):
    """The ymm kernels through VEX vpdpbusd (AVX2 with AVX-VNNI, as on Alder Lake) pass the MoE tests."""
    _passes(isa_runs, "test_avx2_vnni_kernels_in_a_subprocess")


@pytest.mark.skipif(not host_features()["avx512vnni"] or _SUBPROCESS, reason="this process already runs vpmaddwd")
def test_avx512_kernels_without_vnni_in_a_subprocess(isa_runs):
    """The zmm kernels through vpmaddwd (AVX-512 without VNNI, as on Skylake-SP) pass the MoE tests."""
    _passes(isa_runs, "test_avx512_kernels_without_vnni_in_a_subprocess")


@pytest.mark.skipif(not amx.available() or _SUBPROCESS, reason="this process already runs without AMX")
def test_zmm_vnni_kernels_without_amx_in_a_subprocess(isa_runs):
    """Where the CPU has AVX-512 VNNI but no AMX (Zen 4 and 5, Ice Lake), the row kernel takes every
    expert, prompts too: the MoE tests pass compiled for such a target."""
    _passes(isa_runs, "test_zmm_vnni_kernels_without_amx_in_a_subprocess")


def test_head_products_equal_the_float64_einsums():
    """The absorbed-MLA per-head products against float64 einsums over the same kv_b_proj view: T tokens,
    odd sizes, both halves of each head; and they refuse what their loops cannot take."""
    from kernels_cpu.heads import head_absorb, head_values

    rng = np.random.default_rng(11)
    H, P, V, L = 5, 7, 9, 37
    kvb = rng.standard_normal((H, P + V, L)).astype(np.float32)
    k64 = kvb.astype(np.float64)
    for T in (1, 3):
        q = rng.standard_normal((T, H, P)).astype(np.float32)
        o_lat = rng.standard_normal((T, H, L)).astype(np.float32)
        np.testing.assert_allclose(head_absorb(q, kvb), np.einsum("thp,hpl->thl", q.astype(np.float64), k64[:, :P]),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(head_values(o_lat, kvb, P), np.einsum("thl,hvl->thv", o_lat.astype(np.float64), k64[:, P:]),
                                   rtol=1e-5, atol=1e-5)
    # kv_b held as bf16 bits: the same products of the widened values (bf16 -> fp32 is exact)
    bits = (kvb.view(np.uint32) >> 16).astype(np.uint16)
    wide = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    np.testing.assert_allclose(head_absorb(q, bits), np.einsum("thp,hpl->thl", q.astype(np.float64), wide[:, :P]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head_values(o_lat, bits, P), np.einsum("thl,hvl->thv", o_lat.astype(np.float64), wide[:, P:]),
                               rtol=1e-5, atol=1e-5)
    # the serial kernels (where two parallel regions may not run at once) give the same products
    np.testing.assert_array_equal(head_absorb(q, bits, parallel=False), head_absorb(q, bits))
    np.testing.assert_array_equal(head_values(o_lat, bits, P, parallel=False), head_values(o_lat, bits, P))
    q[0, 1, 2] = np.nan  # NaN reaches its head's output only
    y = head_absorb(q, kvb)
    assert np.isnan(y[0, 1]).all() and np.isfinite(np.delete(y[0], 1, axis=0)).all()
    with pytest.raises(ValueError, match="contiguous kv_b"):
        head_absorb(q, kvb[:, ::2])
    with pytest.raises(ValueError, match="contiguous kv_b"):
        head_absorb(q, kvb.astype(np.float16))
    with pytest.raises(ValueError, match="does not fit"):
        head_values(o_lat[:, :, :-1], kvb, P)


def test_mla_tiles_equal_the_float64_products():
    """kernels_cpu.mla_tiles: a ROWS x TILE tile of a @ v over n, stored or added, with each operand's rows
    at its own stride (the tile's columns past TILE untouched), against float64; and aligned's arrays."""
    from numba import njit

    from kernels_cpu.mla_tiles import ROWS, TILE, aligned, tile_add, tile_set

    @njit
    def run(a, v, out, n, add):
        if add:
            tile_add(a.ctypes.data, a.strides[0], v.ctypes.data, v.strides[0], n, out.ctypes.data, out.strides[0])
        else:
            tile_set(a.ctypes.data, a.strides[0], v.ctypes.data, v.strides[0], n, out.ctypes.data, out.strides[0])

    rng = np.random.default_rng(3)
    for n in (1, 7, 576):
        a = rng.standard_normal((ROWS, n + 3)).astype(np.float32)
        v = rng.standard_normal((n, TILE + 5)).astype(np.float32)
        want = a[:, :n].astype(np.float64) @ v[:, :TILE].astype(np.float64)
        out = rng.standard_normal((ROWS + 1, TILE + 2)).astype(np.float32)
        before = out.copy()
        run(a, v, out, n, False)
        np.testing.assert_allclose(out[:ROWS, :TILE], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert (out[:, TILE:] == before[:, TILE:]).all() and (out[ROWS:] == before[ROWS:]).all()
        run(a, v, out, n, True)
        np.testing.assert_allclose(out[:ROWS, :TILE], 2 * want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for rows, cols in ((4, 64), (33, 576), (1, 1)):
        x = aligned(rows, cols)
        assert x.shape == (rows, cols) and x.dtype == np.float32 and x.ctypes.data % 64 == 0


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("L", [32, 24])
def test_mla_decode_equals_the_float64_attention(dtype, L):
    """kernels_cpu.mla.mla_decode, a layer's decode attention in one call, against float64 for 1-3 new
    tokens (each seeing the positions up to its own), a page boundary crossed, pages in any order
    and one in the host tier (a negative table entry), bf16 or fp32 pages and kv_b_proj; a latent
    rank that the value tiles take (32) and one they do not (24: the value sums' loop instead)."""
    from kernels_cpu.mla import mla_decode

    rng = np.random.default_rng(11)
    H, P, R, V, PG = 8, 16, 8, 12, 4

    def stored(a):
        return bf16_bits(a) if dtype == "bf16" else a.astype(np.float32)

    def value(a):
        return ((a.astype(np.uint32) << 16).view(np.float32) if dtype == "bf16" else a).astype(np.float64)

    def rope(x, c, s):
        y = x.copy()
        y[0::2], y[1::2] = x[0::2] * c - x[1::2] * s, x[0::2] * s + x[1::2] * c
        return y

    for T, s0 in ((1, 0), (1, 13), (3, 9), (2, 30)):
        main, spill = stored(rng.standard_normal((12, PG, L + R))), stored(rng.standard_normal((5, PG, L + R)))
        pages = -(-(s0 + T) // PG)
        table = np.concatenate([rng.permutation(12)[:pages], np.zeros(3)]).astype(np.int32)
        if pages > 2:
            table[1] = -1 - 2  # that page lives in the host tier
        q = rng.standard_normal((T, H, P + R)).astype(np.float32)
        ang = rng.uniform(0, 6, (T, R // 2)).astype(np.float32)
        cos, sin = np.cos(ang), np.sin(ang)
        kvb = stored(rng.standard_normal((H, P + V, L)) / 4)
        before = (main.copy(), spill.copy())
        o = mla_decode(q, cos, sin, kvb, main, spill, table, s0, 0.3, 2)
        assert (main == before[0]).all() and (spill == before[1]).all()  # reads the pages only

        def row(pos):
            e = table[pos // PG]
            return value((main[e] if e >= 0 else spill[-1 - e])[pos % PG])

        kvf = value(kvb)
        ref = np.zeros((T, H, V))
        for t in range(T):
            rows = np.stack([row(p) for p in range(s0 + t + 1)])
            for h in range(H):
                qa = q[t, h, :P].astype(np.float64) @ kvf[h, :P]
                sc = (rows[:, :L] @ qa + rows[:, L:] @ rope(q[t, h, P:].astype(np.float64), cos[t], sin[t])) * 0.3
                p = np.exp(sc - sc.max())
                ref[t, h] = (p / p.sum()) @ rows[:, :L] @ kvf[h, P:].T
        np.testing.assert_allclose(o, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        # the new rows written by the call itself from kv_a_proj's output: the latent RMSNorm'd, the key's
        # rope part rotated, rounded as torch stores them; the same pages and the same o as the steps apart
        kv = (rng.standard_normal((T, L + R)) * 3).astype(np.float32)
        norm = rng.uniform(0.5, 2, L).astype(np.float32)
        apart = (main.copy(), spill.copy())
        x64 = kv[:, :L].astype(np.float64)
        latent = norm * x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6)
        for t in range(T):
            pos = s0 + t
            e = table[pos // PG]
            new_row = np.concatenate([latent[t], rope(kv[t, L:].astype(np.float64), cos[t], sin[t])])
            (apart[0][e] if e >= 0 else apart[1][-1 - e])[pos % PG] = stored(new_row.astype(np.float32))
        o_apart = mla_decode(q, cos, sin, kvb, apart[0], apart[1], table, s0, 0.3, 2)
        o_here = mla_decode(q, cos, sin, kvb, main, spill, table, s0, 0.3, 2, kv, norm, 1e-6)
        for got, want in ((main, apart[0]), (spill, apart[1])):  # within one rounding of the float64 rows
            if dtype == "bf16":
                assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1
            else:
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(o_here, o_apart, rtol=1e-4, atol=1e-4 * np.abs(o_apart).max())
        changed = (main != before[0]).any(axis=(1, 2)).sum() + (spill != before[1]).any(axis=(1, 2)).sum()
        assert changed == len({pos // PG for pos in range(s0, s0 + T)})  # the new rows' pages only
    with pytest.raises(ValueError, match="norm fp32"):
        mla_decode(q, cos, sin, kvb, main, spill, table, s0, 0.3, 2, kv[:, :-1].copy(), norm, 1e-6)
    with pytest.raises(ValueError, match="positions"):
        mla_decode(q, cos, sin, kvb, main, spill, table[:1], s0, 0.3, 2)
    with pytest.raises(ValueError, match="outside the pools"):
        mla_decode(q, cos, sin, kvb, main, spill, np.full(16, 99, np.int32), s0, 0.3, 2)
    with pytest.raises(ValueError, match="multiple of 4"):
        mla_decode(q[:, :6].copy(), cos, sin, kvb[:6].copy(), main, spill, table, s0, 0.3, 2)


def test_mla_scores_through_amx_tiles_equal_the_float64_attention():
    """Where AMX's bf16 tiles are granted (mla_amx.usable), a thread with whole tiles of heads (16 of 32 on two
    threads) scores the pages through them: 1 and 3 new tokens over pages in any order, one in the host tier,
    the last one part-filled, against float64 and against the fp32 register tiles (decode_into, amx off)."""
    from kernels_cpu import mla_amx
    from kernels_cpu.mla import decode_into, mla_decode

    H, P, R, L, V, PG = 32, 16, 32, 32, 12, 16
    if not mla_amx.usable(np.empty((1, PG, L + R), np.uint16)):
        pytest.skip("AMX's bf16 tiles are not available here")
    rng = np.random.default_rng(17)
    for T, s0 in ((1, 150), (3, 37)):
        main, spill = bf16_bits(rng.standard_normal((14, PG, L + R))), bf16_bits(rng.standard_normal((3, PG, L + R)))
        pages = -(-(s0 + T) // PG)
        table = rng.permutation(14)[:pages].astype(np.int32)
        table[1] = -1 - 2  # that page lives in the host tier
        q = rng.standard_normal((T, H, P + R)).astype(np.float32)
        ang = rng.uniform(0, 6, (T, R // 2)).astype(np.float32)
        cos, sin = np.cos(ang), np.sin(ang)
        kvb = bf16_bits(rng.standard_normal((H, P + V, L)) / 4)
        o = mla_decode(q, cos, sin, kvb, main, spill, table, s0, 0.3, 2)
        tiles = np.empty_like(o)
        decode_into(q, cos, sin, kvb, main, spill, table, s0, np.float32(0.3), P, tiles, 2,
                    np.empty((0, L + R), np.float32), np.empty(L, np.float32), np.float32(0), False)
        np.testing.assert_allclose(o, tiles, rtol=1e-5, atol=1e-5 * np.abs(tiles).max())

        def row(pos):
            e = table[pos // PG]
            return ((main[e] if e >= 0 else spill[-1 - e])[pos % PG].astype(np.uint32) << 16).view(np.float32)

        kvf = (kvb.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        for t in range(T):
            rows = np.stack([row(p) for p in range(s0 + t + 1)]).astype(np.float64)
            for h in range(H):
                qp = q[t, h, P:].astype(np.float64)
                rot = np.empty_like(qp)
                rot[0::2] = qp[0::2] * cos[t] - qp[1::2] * sin[t]
                rot[1::2] = qp[0::2] * sin[t] + qp[1::2] * cos[t]
                sc = (rows[:, :L] @ (q[t, h, :P].astype(np.float64) @ kvf[h, :P]) + rows[:, L:] @ rot) * 0.3
                p = np.exp(sc - sc.max())
                want = (p / p.sum()) @ rows[:, :L] @ kvf[h, P:].T
                np.testing.assert_allclose(o[t, h], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_mla_decode_takes_thousands_of_positions():
    """The one call at any context length (the engine no longer switches past 2,048 positions): 5,000
    positions over 79 bf16 pages of 64, shuffled, the largest scores late so that the online softmax
    rescales its sums after many pages, against float64."""
    from kernels_cpu.mla import mla_decode

    rng = np.random.default_rng(5)
    H, P, R, V, L, PG, S = 8, 16, 8, 12, 32, 64, 5000
    pages = -(-S // PG)
    rows = rng.standard_normal((pages * PG, L + R)) * np.linspace(0.5, 2.0, pages * PG)[:, None]
    main = bf16_bits(rows).reshape(pages, PG, L + R)
    order = rng.permutation(pages).astype(np.int32)
    pool = np.empty_like(main)
    pool[order] = main  # page k of the sequence lives at pool[order[k]]
    q = rng.standard_normal((1, H, P + R)).astype(np.float32)
    cos, sin = np.ones((1, R // 2), np.float32), np.zeros((1, R // 2), np.float32)
    kvb = bf16_bits(rng.standard_normal((H, P + V, L)) / 4)
    o = mla_decode(q, cos, sin, kvb, pool, pool[:1], order, S - 1, 0.2, 2)
    vals = (main.reshape(-1, L + R)[:S].astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    kvf = (kvb.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    ref = np.zeros((H, V))
    for h in range(H):
        sc = (vals[:, :L] @ (q[0, h, :P].astype(np.float64) @ kvf[h, :P]) + vals[:, L:] @ q[0, h, P:]) * 0.2
        p = np.exp(sc - sc.max())
        ref[h] = (p / p.sum()) @ vals[:, :L] @ kvf[h, P:].T
    np.testing.assert_allclose(o[0], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ---- the RAM read-bandwidth kernels (membw): each load shape reads the bytes it counts (a bandwidth is
# those bytes over the time), and the probe reports every shape and takes the best; in this file so that
# the AVX2 run checks them as built for that target too

def _membw_expected(buf: np.ndarray, nblocks: int, lanes: int, unroll: int, streams: int) -> tuple[int, int]:
    """What read_lines must read of buf, by its documented split: (sum of the 32-bit words mod 2**32, bytes)."""
    raw, n = buf.view(np.uint8), buf.shape[0] // nblocks
    total = nbytes = 0
    seg = 8 * n // streams // 64 * 64
    span = seg // (4 * lanes * unroll) * (4 * lanes * unroll)
    for b in range(nblocks):
        for s in range(streams):
            at = 8 * b * n + s * seg
            assert at + span <= 8 * (b + 1) * n  # inside the block
            total += int(raw[at:at + span].view(np.uint32).sum(dtype=np.uint64))
            nbytes += span
    return total % 2**32, nbytes


@pytest.mark.parametrize("words, nblocks", [((3 << 20) // 8 + 77, 64), ((3 << 20) // 8 + 77, 3), (5000, 7),
                                            (100, 2)])
def test_every_shape_reads_the_bytes_it_counts(words, nblocks):
    """Random words, blocks and streams that do not divide evenly (tails left unread), and a buffer too
    small for a single step (nothing read, nothing counted): the checksum of the words each shape read
    and the bytes it reports against the same split done in NumPy."""
    buf = np.random.default_rng(words + nblocks).integers(0, 2**63, words, dtype=np.uint64)
    for i, (name, lanes, unroll, streams) in enumerate(SHAPES):
        total, nbytes = read_lines(buf, nblocks, i)
        assert (int(total), int(nbytes)) == _membw_expected(buf, nblocks, lanes, unroll, streams), name
    assert read_lines(buf, nblocks, len(SHAPES)) == (0, 0)  # past the table: nothing read


def _spans_expected(raw: np.ndarray, at: np.ndarray, lens: np.ndarray, lanes: int, unroll: int,
                    streams: int) -> tuple[int, int]:
    """What read_spans must read of raw (offsets `at` into it, `lens` bytes each), by the same split as a
    block of read_lines: (sum of the 32-bit words mod 2**32, bytes)."""
    total = nbytes = 0
    for a, n in zip(at, lens):
        seg = int(n) // streams // 64 * 64
        span = seg // (4 * lanes * unroll) * (4 * lanes * unroll)
        for s in range(streams):
            total += int(raw[a + s * seg:a + s * seg + span].view(np.uint32).sum(dtype=np.uint64))
            nbytes += span
    return total % 2**32, nbytes


def test_spans_are_cut_into_pieces_and_read_where_they_lie():
    """span_pieces covers each span exactly, in order, in pieces of at most the limit; read_spans reads each
    piece in place by a block's split (checksum and bytes against NumPy over the same words), the spans
    anywhere in memory and at any alignment; read_spans_gbps refuses under 1 MB."""
    with pytest.raises(ValueError, match="multiple of 64"):
        membw.span_pieces(np.array([0], np.int64), np.array([100], np.int64), 100)
    at, ln = membw.span_pieces(np.array([1000, 5000, 9], np.int64), np.array([250, 64, 700], np.int64), 128)
    assert at.tolist() == [1000, 1128, 5000, 9, 137, 265, 393, 521, 649]
    assert ln.tolist() == [128, 122, 64, 128, 128, 128, 128, 128, 60]
    raw = np.random.default_rng(5).integers(0, 256, 3 << 20, dtype=np.uint8)
    offs, lens = np.array([13, 1 << 20, 2_500_000], np.int64), np.array([700_001, 65_536 + 64, 300_000], np.int64)
    pa, pl = membw.span_pieces(raw.ctypes.data + offs, lens, 200_064)
    for i, (name, lanes, unroll, streams) in enumerate(SHAPES):
        want = _spans_expected(raw, pa - raw.ctypes.data, pl, lanes, unroll, streams)
        for threads in {1, 2, numba.get_num_threads()}:  # every piece read once, whichever thread takes it
            total, nbytes = membw.read_spans(pa, pl, i, threads)
            assert (int(total), int(nbytes)) == want, (name, threads)
    assert membw.read_spans_gbps(raw.ctypes.data + offs, lens, reps=1) > 0
    with pytest.raises(ValueError, match="at least 1 MB of spans"):
        membw.read_spans_gbps(raw.ctypes.data + offs[:1], lens[:1])
    tiny = raw.ctypes.data + 64 * np.arange(20_000, dtype=np.int64)  # 1.2 MB of 60-byte spans: no step fits
    with pytest.raises(ValueError, match="long enough for one step"):
        membw.read_spans_gbps(tiny, np.full(20_000, 60, np.int64))


def test_read_spans_gbps_flushes_before_every_timed_read(monkeypatch):
    """With a flush buffer, read_sum reads it before each shape's timed read, every rep; without, never."""
    raw = np.ones(2 << 20, np.uint8)
    flush, calls = np.ones(1 << 17, np.uint64), []
    monkeypatch.setattr(membw, "read_sum", lambda buf, n: calls.append(buf is flush))
    membw.read_spans_gbps(np.array([raw.ctypes.data], np.int64), np.array([raw.nbytes], np.int64), 2, flush)
    assert calls == [True] * 2 * len(SHAPES)
    membw.read_spans_gbps(np.array([raw.ctypes.data], np.int64), np.array([raw.nbytes], np.int64), 2)
    assert len(calls) == 2 * len(SHAPES)


def test_the_probe_times_every_shape_and_reports_the_best(monkeypatch):
    """read_gbps_by_shape covers read_sum and each of SHAPES over a buffer past a step; read_gbps is the
    best of them (the figure every bench and plan divides by)."""
    buf = np.ones((4 << 20) // 8, np.uint64)
    figures = read_gbps_by_shape(buf, reps=2)
    assert set(figures) == {"read_sum"} | {s[0] for s in SHAPES} and all(g > 0 for g in figures.values())
    for bad in (buf.view(np.uint8), buf[::-1], buf[:1000]):  # other words, a reversed view, too few words
        with pytest.raises(ValueError, match="contiguous uint64 buffer of at least 8192 words"):
            read_gbps_by_shape(bad, 1)
    threads = numba.get_num_threads()
    assert membw.read_gbps(buf, 1, threads=1) > 0 and numba.get_num_threads() == threads  # given back
    fixed = {"read_sum": 30.0, "ymm, 2 streams": 37.0, "xmm, 2 streams": 35.0}
    monkeypatch.setattr(membw, "read_gbps_by_shape", lambda b, reps: fixed)
    assert membw.read_gbps(buf, 2) == 37.0


def test_int8_gemv_over_tiles_is_the_row_product():
    """int8tiles: the tiles hold the rows' columns where tile_rows says; the GEMV over them is the int8
    product of the codes (float64 over the same activation codes, to fp32's summation), for every token
    count and one token's rows alike, within fp32 rounding of widen's row-major GEMV; shapes off the tiles
    are refused with their numbers."""
    from kernels_cpu.int8tiles import TILE_COLS, TILE_ROWS, int8_gemv_tiles, tile_rows
    from kernels_cpu.simd import host_has_avx2
    from kernels_cpu.widen import MAX_ROWS, int8_gemv

    if not host_has_avx2():
        pytest.skip("the tile kernel is AVX2 code (widen's int8 kernels)")
    rng = np.random.default_rng(5)
    O, I = 5 * TILE_ROWS, 3 * TILE_COLS
    q = rng.integers(-127, 128, (O, I), dtype=np.int64).astype(np.int8)
    q[0, :3] = (-127, 127, 0)
    scale = bf16_bits(np.logspace(-4, 0, O))
    sf = (scale.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    tiles = tile_rows(q)
    assert tiles.shape == (O // TILE_ROWS, I // TILE_COLS, TILE_ROWS, TILE_COLS)
    np.testing.assert_array_equal(tiles[3, 2, 5], q[3 * TILE_ROWS + 5, 2 * TILE_COLS:3 * TILE_COLS])
    for T in range(1, MAX_ROWS + 1):
        x = rng.standard_normal((T, I)).astype(np.float32)
        x[-1, 7] = 30.0  # an outlier: its block's other values get coarser codes
        xq, xs = _int16_blocks(x)
        exact = np.einsum("tbi,obi,tb->to", xq, q.astype(np.float64).reshape(O, -1, 128), xs) * sf
        got = int8_gemv_tiles(x, tiles, scale)
        np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())
        np.testing.assert_allclose(got, int8_gemv(x, q, scale), rtol=1e-6, atol=1e-6 * np.abs(exact).max())
        np.testing.assert_array_equal(int8_gemv_tiles(x[-1:], tiles, scale), got[-1:])  # a row's sums: one order
    with pytest.raises(ValueError, match=r"int8 codes \[O, I\].*\(12, 512\)"):
        tile_rows(q[:12, :TILE_COLS])
    with pytest.raises(ValueError, match=r"\[T, 1536\]"):
        int8_gemv_tiles(np.zeros((1, 1024), np.float32), tiles, scale)
    with pytest.raises(ValueError, match="tile_rows"):
        int8_gemv_tiles(np.zeros((1, I), np.float32), q, scale)


def test_int8_tiles_round_trip_and_two_weights_in_one_region():
    """int8tiles: tile_into writes numpy's transposed layout, untile_into gives back any block of rows,
    dequantize_tiles any rows as dequantize_rows gives them, the logical shape of either layout is [O, I];
    gemv_tiles_into over two weights (the fused decode steps' pair) gives each weight's int8_gemv_tiles bit for bit."""
    from kernels_cpu.int8dot import dequantize_rows, quantize_activations
    from kernels_cpu.int8tiles import (TILE_COLS, TILE_ROWS, dequantize_tiles, gemv_tiles_into, int8_gemv_tiles,
                                       logical_shape, tile_rows, untile_into)
    from kernels_cpu.simd import host_has_avx2

    if not host_has_avx2():
        pytest.skip("the tile kernel is AVX2 code (widen's int8 kernels)")
    rng = np.random.default_rng(8)
    O, I = 7 * TILE_ROWS, 2 * TILE_COLS
    q = rng.integers(-127, 128, (O, I), dtype=np.int64).astype(np.int8)
    tiles = tile_rows(q)
    want = q.reshape(O // TILE_ROWS, TILE_ROWS, I // TILE_COLS, TILE_COLS).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(tiles, want)
    assert logical_shape(tiles) == logical_shape(q) == (O, I)
    for lo, n in ((0, O), (2 * TILE_ROWS, 3 * TILE_ROWS), (6 * TILE_ROWS, TILE_ROWS)):
        out = np.zeros((n, I), np.int8)
        untile_into(tiles, lo, out)
        np.testing.assert_array_equal(out, q[lo:lo + n])
    s32 = rng.uniform(0.001, 0.01, O).astype(np.float32)
    for lo, n, par in ((0, O, True), (5, 21, False), (3 * TILE_ROWS, 1, True)):  # any rows, as dequantize_rows
        got, want = np.empty((n, I), np.float32), np.empty((n, I), np.float32)
        dequantize_tiles(tiles, s32, lo, got, par)
        dequantize_rows(q[lo:lo + n], s32[lo:lo + n], want, par)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    with pytest.raises(ValueError, match=r"dequantize_tiles: .*lo 50"):
        dequantize_tiles(tiles, s32, 50, np.empty((7, I), np.float32))
    with pytest.raises(ValueError, match=r"dequantize_tiles: .*tiles int8 \(56,\)"):
        dequantize_tiles(q[:, 0].copy(), s32, 0, np.empty((1, I), np.float32))
    q2 = rng.integers(-127, 128, (3 * TILE_ROWS, I), dtype=np.int64).astype(np.int8)
    t2 = tile_rows(q2)
    s1, s2 = bf16_bits(rng.uniform(0.01, 1, O)), bf16_bits(rng.uniform(0.01, 1, 3 * TILE_ROWS))
    for T in (1, 3):
        x = rng.standard_normal((T, I)).astype(np.float32)
        out1, out2 = np.empty((T, O), np.float32), np.empty((T, 3 * TILE_ROWS), np.float32)
        gemv_tiles_into(*quantize_activations(x), tiles, s1, out1, t2, s2, out2, 2)
        np.testing.assert_array_equal(out1, int8_gemv_tiles(x, tiles, s1))
        np.testing.assert_array_equal(out2, int8_gemv_tiles(x, t2, s2))
