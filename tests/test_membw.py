"""The RAM read-bandwidth kernels (kernels_cpu/membw.py): each load shape reads the bytes it counts (a
bandwidth is those bytes over the time), and the probe reports every shape and takes the best."""
from __future__ import annotations

import numpy as np
import pytest

from kernels_cpu import membw
from kernels_cpu.membw import SHAPES, read_gbps_by_shape, read_lines


def _expected(buf: np.ndarray, nblocks: int, lanes: int, unroll: int, streams: int) -> tuple[int, int]:
    """What read_lines must read of buf, by its documented split: (sum of the 32-bit words mod 2**32, bytes)."""
    raw, n = buf.view(np.uint8), buf.shape[0] // nblocks
    seg = 8 * n // streams // 64 * 64
    span = seg // (4 * lanes * unroll) * (4 * lanes * unroll)
    total = nbytes = 0
    for b in range(nblocks):
        for s in range(streams):
            at = 8 * b * n + s * seg
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
        assert (int(total), int(nbytes)) == _expected(buf, nblocks, lanes, unroll, streams), name
    assert read_lines(buf, nblocks, len(SHAPES)) == (0, 0)  # past the table: nothing read


def test_the_probe_times_every_shape_and_reports_the_best(monkeypatch):
    """read_gbps_by_shape covers read_sum and each of SHAPES over a buffer past a step; read_gbps is the
    best of them (the figure every bench and plan divides by)."""
    buf = np.ones((4 << 20) // 8, np.uint64)
    figures = read_gbps_by_shape(buf, reps=2)
    assert set(figures) == {"read_sum"} | {s[0] for s in SHAPES} and all(g > 0 for g in figures.values())
    fixed = {"read_sum": 30.0, "ymm, 2 streams": 37.0, "xmm, 2 streams": 35.0}
    monkeypatch.setattr(membw, "read_gbps_by_shape", lambda b, reps: fixed)
    assert membw.read_gbps(buf, 2) == 37.0
