"""`kimi-hybrid bench --kernels`: CPU expert kernel figures against this machine's own ceilings.

Owns the measurement only (returns one JSON-able dict; cli.py prints it). Everything is measured in
the same run on E = 32 random K2-shaped experts (793 MB, far beyond the LLC): DRAM read bandwidth
(kernels_cpu.membw.read_gbps over 1 GiB, all threads: the best of several load shapes), moe_forward
at decode (1 token, 8 experts) and prefill (qlen 16/128/512 over the 32 experts; 64 tokens per
expert; 512 tokens over 384 experts aliased onto the 32, the real model's density), the bf16-weight
GEMV of a GPU side on the CPU against torch's fp32 GEMV, torch's fp32 matmul 512x7168x2048, 1-thread vs
all-thread scaling, and peers on the same experts (torch int4pack; KTransformers' AVX2RawInt4_MOE if present).
Times are the best of several repetitions, decode interleaved with the bandwidth probe, because other
processes share the cores and the memory bus; compare ratios within one run.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.machinery
import importlib.util
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import llvmlite.binding as llvm_binding
import numba
import numpy as np
import torch

from kernels_cpu import ExpertTable, moe_forward
from kernels_cpu.membw import read_gbps, read_sum

log = logging.getLogger(__name__)

K2 = dict(hidden=7168, inter=2048, experts=32, topk=8, model_experts=384, gemv=(7168, 8192))  # gemv: o_proj
SMALL = dict(hidden=256, inter=128, experts=8, topk=4, model_experts=96, gemv=(256, 512))


def _cpu_seconds() -> tuple[float, float, float]:
    """(wall, this process's CPU, whole machine's busy CPU) in seconds, from /proc (Linux)."""
    ours = sum(os.times()[:2])
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = ours
    return time.perf_counter(), ours, busy


def _best(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


@dataclass
class _Experts:
    """E random experts in one arena, part-major (all gate.packed, then all gate.scale, ...)."""
    table: ExpertTable
    parts: list[np.ndarray]     # views [E, rows, bytes per row] of the arena, order of PARTS
    expert_bytes: int


def _random_experts(D: int, I: int, E: int, rng: np.random.Generator) -> _Experts:
    # uniform random nibbles (all 16 codes) and bf16 scales in [2^-7, 2^-6): speed does not
    # depend on the values, and quantising 1.4 G weights would dominate the run
    shapes = [(I, D // 2), (I, D // 16), (I, D // 2), (I, D // 16), (D, I // 2), (D, I // 16)]
    sizes = [E * r * c for r, c in shapes]
    arena = np.empty(sum(sizes), np.uint8)
    words = arena.view(np.uint64)
    for s in range(0, words.size, 1 << 24):
        words[s:s + (1 << 24)] = rng.integers(0, 2**63, min(1 << 24, words.size - s), dtype=np.uint64)
    loc = np.zeros((E, 6, 2), np.int64)
    parts, pos = [], 0
    for m, ((r, c), size) in enumerate(zip(shapes, sizes)):
        view = arena[pos:pos + size].reshape(E, r, c)
        if m % 2:
            view.view(np.uint16).reshape(-1)[:] = 0x3C00 + rng.integers(0, 128, view.size // 2, dtype=np.uint16)
        loc[:, m, 1] = pos + np.arange(E) * r * c
        parts.append(view)
        pos += size
    per = sum(r * c for r, c in shapes)
    return _Experts(ExpertTable([arena], loc, D, I), parts, per)


def _routing(T: int, E: int, K: int, rng: np.random.Generator):
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)   # K distinct per token
    w = rng.random((T, K)).astype(np.float32)
    return ids, w / w.sum(1, keepdims=True)


def _prefill_entry(ex: _Experts, table: ExpertTable, T: int, K: int, reps: int,
                   rng: np.random.Generator) -> dict:
    D, I, E = table.hidden, table.inter, table.num_experts
    x = rng.standard_normal((T, D)).astype(np.float32)
    ids, w = _routing(T, E, K, rng)
    out = np.empty((T, D), np.float32)
    moe_forward(x, ids, w, table, out)
    dt = _best(lambda: moe_forward(x, ids, w, table, out), reps)
    return {"ms": dt * 1e3, "tokens_per_s": T / dt, "gflops": 6 * D * I * T * K / dt / 1e9,
            "tokens_per_expert": T * K / E}


def _torch_peer(ex: _Experts, D: int, I: int, K: int, T_prefill: int, reps: int,
                rng: np.random.Generator) -> dict:
    """Same experts through torch's int4pack GEMM, expert by expert.

    bf16 activations and scales: torch's fast path on CPU (its fp32-activation path measured ~50x
    slower at decode on this machine).
    """
    E = ex.table.num_experts
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)

    def convert(packed_u8: np.ndarray, scale_u16: np.ndarray):
        rows = packed_u8.shape[0]
        words = torch.from_numpy(packed_u8.view(np.int32))
        codes = ((words.unsqueeze(-1) >> shifts) & 15).reshape(rows, -1)   # [N, K] in 0..15
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        scale = torch.from_numpy(scale_u16.view(np.int16).copy()).view(torch.bfloat16)
        sz = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1).contiguous()  # [K/G, N, 2]
        return w, sz

    mats = [[convert(ex.parts[2 * j][e], ex.parts[2 * j + 1][e]) for j in range(3)] for e in range(E)]
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu

    def forward(x, ids, w):
        out = torch.zeros(x.shape, dtype=torch.float32)
        for e in torch.unique(ids).tolist():
            t, k = torch.nonzero(ids == e, as_tuple=True)
            xe = x[t]
            (gw, gs), (uw, us), (dw, ds) = mats[e]
            h = (torch.nn.functional.silu(mm(xe, gw, 32, gs).float()) * mm(xe, uw, 32, us).float())
            out.index_add_(0, t, mm(h.to(torch.bfloat16), dw, 32, ds).float() * w[t, k, None])
        return out

    res = {}
    for name, T in (("decode", 1), ("prefill_" + str(T_prefill), T_prefill)):
        ids, w = _routing(T, E, K, rng)
        x, ids_t, w_t = torch.randn(T, D).to(torch.bfloat16), torch.from_numpy(ids), torch.from_numpy(w)
        forward(x, ids_t, w_t)
        dt = _best(lambda: forward(x, ids_t, w_t), reps)
        res[name] = {"ms": dt * 1e3, "gbps": min(E, T * K) * ex.expert_bytes / dt / 1e9 if T == 1 else None,
                     "tokens_per_s": T / dt, "gflops": 6 * D * I * T * K / dt / 1e9}
    return res


@contextlib.contextmanager
def _stdout_to_stderr():
    """kt-kernel's C++ code prints to file descriptor 1; keep the JSON on stdout clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _load_kt_ext():
    spec = importlib.util.find_spec("kt_kernel")
    if spec is None or not spec.submodule_search_locations:
        return None, "kt-kernel is not installed (its wheel pins torch==2.9.1 with CUDA; not a dependency)"
    found = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_kt_kernel_ext_avx2*.so"))
    if not found:
        return None, "kt-kernel has no avx2 extension module"
    loader = importlib.machinery.ExtensionFileLoader("kt_kernel_ext", found[0])
    spec = importlib.util.spec_from_file_location("kt_kernel_ext", found[0], loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod, ""


def _kt_peer(ex: _Experts, D: int, I: int, K: int, T_prefill: int, threads: int, reps: int,
             rng: np.random.Generator) -> dict:
    """KTransformers' AVX2RawInt4_MOE over the same bytes (its RAWINT4 layout is the checkpoint's)."""
    try:
        kt, reason = _load_kt_ext()
    except (ImportError, OSError) as e:
        kt, reason = None, f"loading kt-kernel's avx2 module failed: {e}"
    if kt is None:
        log.info("ktransformers peer skipped: %s", reason)
        return {"available": False, "reason": reason}
    E = ex.table.num_experts
    cpu = kt.CPUInfer(threads)
    cfg = kt.moe.MOEConfig(E, K, D, I, 0)
    cfg.max_len = max(T_prefill, 1)
    cfg.gate_proj, cfg.gate_scale = ex.parts[0].ctypes.data, ex.parts[1].ctypes.data
    cfg.up_proj, cfg.up_scale = ex.parts[2].ctypes.data, ex.parts[3].ctypes.data
    cfg.down_proj, cfg.down_scale = ex.parts[4].ctypes.data, ex.parts[5].ctypes.data
    cfg.quant_config.bits, cfg.quant_config.group_size, cfg.quant_config.zero_point = 4, 32, False
    cfg.pool = cpu.backend_
    moe = kt.moe.AVX2RawInt4_MOE(cfg)
    p2l = np.arange(E, dtype=np.int64)
    cpu.submit(moe.load_weights_task(p2l.ctypes.data))
    cpu.sync()
    res: dict = {"available": True, "class": "AVX2RawInt4_MOE", "variant": getattr(kt, "__cpu_variant__", "avx2")}
    for name, T in (("decode", 1), ("prefill_" + str(T_prefill), T_prefill)):
        ids, w = _routing(T, E, K, rng)
        x = torch.randn(T, D).to(torch.bfloat16)
        out = torch.empty(T, D, dtype=torch.bfloat16)
        bsz = np.array([T], np.int32)

        def run():
            cpu.submit(moe.forward_task(bsz.ctypes.data, K, ids.ctypes.data, w.ctypes.data,
                                        x.data_ptr(), out.data_ptr(), False))
            cpu.sync()
        run()
        dt = _best(run, reps)
        res[name] = {"ms": dt * 1e3, "gbps": T * K * ex.expert_bytes / dt / 1e9 if T == 1 else None,
                     "tokens_per_s": T / dt, "gflops": 6 * D * I * T * K / dt / 1e9}
    return res


def _dense_gemv(shp: dict, reps: int, rng: np.random.Generator, probe: np.ndarray, mem_gbps: float) -> dict:
    """The GPU side's decode GEMV when it runs on the CPU, on K2's o_proj shape ([hidden, 64 x 128]):
    kernels_cpu.widen over bf16 weights (what the engine holds) against torch's fp32 GEMV over fp32
    copies of the same weights (what it held before), each with the bytes it reads. Each repetition
    reads the next of as many copies as the probe's buffer takes, so that, as in a decode step, the
    weights come from RAM: one 117 MB weight read again stayed in a 480 MB last-level cache (a 2-core
    Xeon VM: 44 GB/s against the probe's 31). The int8 GEMV (int8w's products) the same way, over int8
    codes with a bf16 scale per row: 1 byte a weight, so the two read the same memory at different rates;
    and over the same codes as int8tiles' tiles, as int8w holds them on a CPU where the shape fits (None
    where the CPU does not run the tile kernel)."""
    from kernels_cpu.int8tiles import int8_gemv_tiles, tile_rows, usable
    from kernels_cpu.widen import bf16_gemv, int8_gemv

    O, In = shp["gemv"]
    w = torch.from_numpy(rng.standard_normal((O, In), dtype=np.float32) * 0.02).to(torch.bfloat16)
    x = rng.standard_normal((1, In)).astype(np.float32)
    xt, out = torch.from_numpy(x), np.empty((1, O), np.float32)
    turn = itertools.count()
    w16 = w.view(torch.int16).numpy().view(np.uint16)
    t16 = _from_ram(lambda a: bf16_gemv(x, a, out), w16, probe, reps, turn)
    q8, s8 = rng.integers(-127, 128, (O, In), dtype=np.int8), np.full(O, 0x3C00, np.uint16)  # bf16 row scales
    t8 = _from_ram(lambda a: int8_gemv(x, a, s8, out), q8, probe, reps, turn)
    tt = _from_ram(lambda a: int8_gemv_tiles(x, a, s8), tile_rows(q8), probe, reps, turn) if usable(O, In) else None
    w32s = [w.float() for _ in range(-(-probe.nbytes // (4 * O * In)))]
    t32 = _best(lambda: torch.mm(xt, w32s[next(turn) % len(w32s)].T), reps * len(w32s))
    g16, g8, g32 = 2 * O * In / t16 / 1e9, O * (In + 2) / t8 / 1e9, 4 * O * In / t32 / 1e9
    gt = None if tt is None else O * (In + 2) / tt / 1e9
    return {"shape": [O, In], "bf16_ms": t16 * 1e3, "bf16_gbps": g16, "bf16_pct_of_mem_read": 100 * g16 / mem_gbps,
            "int8_ms": t8 * 1e3, "int8_gbps": g8, "int8_pct_of_mem_read": 100 * g8 / mem_gbps,
            "int8_tiles_ms": None if tt is None else tt * 1e3, "int8_tiles_gbps": gt,
            "int8_tiles_pct_of_mem_read": None if gt is None else 100 * gt / mem_gbps,
            "torch_fp32_ms": t32 * 1e3, "torch_fp32_gbps": g32, "speedup": t32 / t16}


def _from_ram(fn, w: np.ndarray, probe: np.ndarray, reps: int, turn: Iterator[int]) -> float:
    """Best seconds of fn(a copy of w), over as many copies as the probe's buffer takes (one set at a
    time: about the probe's size), taken in turn so that each call reads its weight from RAM; each copy
    is run once first (compiling and faulting it in), then the caches flushed with the probe's read."""
    copies = [w.copy() for _ in range(-(-probe.nbytes // w.nbytes))]
    for a in copies:
        fn(a)
    read_sum(probe, 64)
    return _best(lambda: fn(copies[next(turn) % len(copies)]), reps * len(copies))


def _decode(ex: _Experts, probe: np.ndarray, K: int, reps: int, rng: np.random.Generator, n_threads: int) -> dict:
    """Decode and the bandwidth probe (membw.read_gbps, one rep of each shape) on n_threads, interleaved
    so both see the same interference."""
    nt = numba.get_num_threads()
    numba.set_num_threads(n_threads)
    try:
        D, E = ex.table.hidden, ex.table.num_experts
        x = rng.standard_normal((1, D)).astype(np.float32)
        out = np.empty((1, D), np.float32)
        moe_forward(x, *_routing(1, E, K, rng), ex.table, out)
        read_gbps(probe, 1)
        td, bws = [], []
        for _ in range(reps * 2):
            ids, w = _routing(1, E, K, rng)
            td.append(_best(lambda: moe_forward(x, ids, w, ex.table, out), 1))
            bws.append(read_gbps(probe, 1))
    finally:
        numba.set_num_threads(nt)
    td, bws = np.array(td), np.array(bws)
    gbps, bw = K * ex.expert_bytes / td.min() / 1e9, float(bws.max())
    return {"ms": td.min() * 1e3, "gbps": gbps, "mem_read_gbps": bw, "pct_of_mem_read": 100 * gbps / bw,
            "ms_median": float(np.median(td)) * 1e3,
            # each decode against the probe run right after it: robust to load changes
            "pct_of_mem_read_paired_median": float(np.median(K * ex.expert_bytes / td / 1e9 / bws)) * 100}


def _prefill(ex: _Experts, shp: dict, reps: int, rng: np.random.Generator) -> dict:
    """moe_forward at prefill: qlen 16/128/512, 64 tokens per expert and the real model's density,
    against torch's fp32 matmul of the same width."""
    D, I, E, K = ex.table.hidden, ex.table.inter, ex.table.num_experts, shp["topk"]
    out: dict = {"moe_prefill": {str(T): _prefill_entry(ex, ex.table, T, K, max(2, reps // 4), rng)
                                 for T in (16, 128, 512)}}
    a, b = torch.randn(512, D), torch.randn(D, I)
    torch.mm(a, b)
    fp32 = out["fp32_matmul_gflops"] = 2 * 512 * D * I / _best(lambda: torch.mm(a, b), reps) / 1e9
    dense = _prefill_entry(ex, ex.table, 64 * E // K, K, max(2, reps // 4), rng)
    out["prefill_64_per_expert"] = dict(dense, pct_of_fp32_matmul=100 * dense["gflops"] / fp32)
    # the real model's density: 512 tokens over 384 experts, aliased onto the E stored ones
    M = shp["model_experts"]
    alias = ExpertTable(ex.table.arenas, np.ascontiguousarray(ex.table.loc[np.arange(M) % E]), D, I)
    model = _prefill_entry(ex, alias, 512, K, max(2, reps // 4), rng)
    out["prefill_model_density"] = dict(model, experts=M, pct_of_fp32_matmul=100 * model["gflops"] / fp32)
    return out


def _scaling(ex: _Experts, probe: np.ndarray, K: int, reps: int, rng: np.random.Generator, nt: int) -> dict:
    """Decode and prefill on 1 thread and on all nt."""
    scaling = {}
    for n in sorted({1, nt}):
        d = _decode(ex, probe, K, reps, rng, n)
        numba.set_num_threads(n)
        pre = _prefill_entry(ex, ex.table, 64 * ex.table.num_experts // K, K, 2, rng)
        numba.set_num_threads(nt)
        scaling[str(n)] = {"mem_read_gbps": d["mem_read_gbps"], "decode_ms": d["ms"],
                           "decode_gbps": d["gbps"], "decode_pct_of_mem_read": d["pct_of_mem_read"],
                           "prefill_64_per_expert_gflops": pre["gflops"]}
    return scaling


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Numba and torch on n threads for the run, restored after (the caller's process goes on)."""
    numba_threads, torch_threads = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(n)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(numba_threads)
        torch.set_num_threads(torch_threads)


def run_kernel_bench(small: bool = False, threads: int | None = None) -> dict:
    """Measure and return the figures of issue 3 as a JSON-able dict (see module docstring)."""
    shp = SMALL if small else K2
    D, I, E, K = shp["hidden"], shp["inter"], shp["experts"], shp["topk"]
    nt = threads or numba.config.NUMBA_NUM_THREADS
    rng = np.random.default_rng(0)
    reps = 3 if small else 15
    with _threads(nt):
        ex = _random_experts(D, I, E, rng)
        probe = np.ones((16 if small else 1024) << 17, np.uint64)      # 16 MiB / 1 GiB
        cpu0 = _cpu_seconds()
        dec = _decode(ex, probe, K, reps, rng, nt)
        bw = dec.pop("mem_read_gbps")
        result: dict = {
            "config": {"hidden": D, "inter": I, "group": 32, "experts": E, "topk": K, "threads": nt,
                       "small": small, "expert_mb": ex.expert_bytes / 1e6,
                       "working_set_mb": E * ex.expert_bytes / 1e6,
                       "activations": "int16 per group of 32 (tolerance 1e-4)",
                       "host_cpu": llvm_binding.get_host_cpu_name(),
                       "host_avx512": bool(llvm_binding.get_host_cpu_features().get("avx512f", False)),
                       "loadavg_1min": os.getloadavg()[0]},
            "mem_read_gbps": bw,
            "moe_decode": dec,
        }
        result["dense_gemv"] = _dense_gemv(shp, reps, rng, probe, bw)
        result.update(_prefill(ex, shp, reps, rng))
        result["threads"] = _scaling(ex, probe, K, reps, rng, nt)
        if small:
            kt = {"available": False, "reason": "not run by the small smoke configuration"}
        else:
            with _stdout_to_stderr():
                kt = _kt_peer(ex, D, I, K, 16, nt, max(2, reps // 3), rng)
        result["peers"] = {"torch_int4pack": _torch_peer(ex, D, I, K, 16, max(2, reps // 3), rng),
                           "ktransformers": kt}
        wall, ours, busy = (b - a for a, b in zip(cpu0, _cpu_seconds()))
        # CPU time other processes took while this ran (they share the cores and the memory bus)
        result["config"]["other_processes_cpu_pct"] = 100 * max(0.0, busy - ours) / (wall * os.cpu_count())
        return result
