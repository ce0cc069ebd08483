#!/usr/bin/env python3
"""One token's int8 GEMV over row-major codes (kernels_cpu.widen.int8_gemv: what `int8w` decodes with where
a weight's shape takes no tiles) against the same codes as tiles (kernels_cpu.int8tiles: how the engine
holds them where it does), on the row lengths of K2's int8w weights, interleaved call by call, beside the
RAM read probe; prints JSON (--table: a table).

    python scripts/int8_layout_bench.py [--mb 900] [--rounds 3] [--threads N] [--table]

Each row length gets one matrix of random codes, rows enough for about --mb MB (far past the caches):
the streaming rate depends on the row length and the order, not on the values. Per round each layout
runs three times (best kept), then the probe; the figures are the best round's, the probe the best.
"""
from __future__ import annotations

import argparse
import json
import time

import numba
import numpy as np

from kernels_cpu.int8tiles import TILE_COLS, TILE_ROWS, int8_gemv_tiles, tile_rows
from kernels_cpu.membw import read_gbps
from kernels_cpu.widen import int8_gemv

# row length -> the K2 int8w weights whose rows have it
ROW_LENGTHS = {7168: "q_a, kv_a, shared and dense gate/up, lm_head", 8192: "o_proj", 18432: "dense down",
               1536: "q_b", 2048: "shared down"}


def _best(fn, n: int = 3) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(I: int, mb: int, rounds: int, probe_buf: np.ndarray, rng: np.random.Generator) -> dict:
    O = max(TILE_ROWS, (mb << 20) // I // TILE_ROWS * TILE_ROWS)
    q = rng.integers(-127, 128, (O, I), dtype=np.int8)
    tiles = tile_rows(q)
    scale = np.full(O, 0x3F80, np.uint16)  # bf16 1.0
    x = rng.standard_normal((1, I)).astype(np.float32)
    int8_gemv(x, q, scale), int8_gemv_tiles(x, tiles, scale)  # compile, or load from Numba's cache
    rows, tiled, probes = [], [], []
    for _ in range(rounds):
        rows.append(q.nbytes / _best(lambda: int8_gemv(x, q, scale)) / 1e9)
        tiled.append(q.nbytes / _best(lambda: int8_gemv_tiles(x, tiles, scale)) / 1e9)
        probes.append(read_gbps(probe_buf))
    probe = max(probes)
    return {"row_bytes": I, "weights": ROW_LENGTHS.get(I, ""), "matrix_mb": q.nbytes / 2**20,
            "rows_gbps": max(rows), "tiles_gbps": max(tiled), "tiles_over_rows": max(tiled) / max(rows),
            "probe_gbps": probe, "rows_pct_of_probe": 100 * max(rows) / probe,
            "tiles_pct_of_probe": 100 * max(tiled) / probe, "probes": probes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=900, help="MB of codes a matrix (default 900)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per row length (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="Numba threads (default: all)")
    ap.add_argument("--row-bytes", type=int, nargs="*", default=list(ROW_LENGTHS),
                    help="row lengths to run (multiples of 512; default K2's)")
    ap.add_argument("--table", action="store_true", help="print a table instead of JSON")
    a = ap.parse_args()
    if a.mb < 1 or a.rounds < 1 or any(I <= 0 or I % TILE_COLS for I in a.row_bytes):
        ap.error(f"--mb and --rounds must be at least 1 and each --row-bytes a positive multiple of {TILE_COLS}")
    if a.threads:
        numba.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    probe_buf = np.ones(1 << 27, np.uint64)  # 1 GB, as bench's probe
    out = {"threads": numba.get_num_threads(), "results": [measure(I, a.mb, a.rounds, probe_buf, rng)
                                                           for I in a.row_bytes]}
    if not a.table:
        print(json.dumps(out, indent=1))
        return
    print(f"{'row bytes':>9} {'rows GB/s':>9} {'tiles GB/s':>10} {'tiles/rows':>10} {'probe':>6}  weights")
    for r in out["results"]:
        print(f"{r['row_bytes']:>9} {r['rows_gbps']:>9.1f} {r['tiles_gbps']:>10.1f} {r['tiles_over_rows']:>10.3f} "
              f"{r['probe_gbps']:>6.1f}  {r['weights']}")


if __name__ == "__main__":
    main()
