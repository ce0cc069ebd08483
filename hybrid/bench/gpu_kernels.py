"""Timing of the GPU-side kernels at Kimi K2 shapes, printed as one JSON object (scripts/gpu_check.sh).

Owns measuring, not deciding: figures for MLA decode, INT4 hot-expert GEMV/GEMM, int8 linear, PCIe
and the prefill offload threshold they imply. Runs on CUDA (bf16) or, for testing, on the CPU (fp32).
`python -m hybrid.bench.gpu_kernels [--small] [--cpu-tps N] [--pcie-gbps X]`. Imports nothing from hybrid/.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch

from hybrid.runtime.graphs import GraphedStep
from hybrid.experts.hot import HotSlots
from kernels_gpu.int4 import DeviceInt4, hot_expert_moe, int4_linear
from kernels_gpu.int8 import int8_linear, pick_kernel, quantize_int8
from kernels_gpu.mla import mla_decode
from hybrid.experts.upload import PrefillSpeeds, expert_flops_per_token, measure_pcie_gbps, offload_threshold

log = logging.getLogger(__name__)

K2 = dict(H=64, L=512, R=64, P=128, V=128, D=7168, F=2048, K=8, E=384, contexts=(4096, 32768), prefill_T=512)
SMALL = dict(H=4, L=64, R=16, P=32, V=32, D=256, F=128, K=8, E=384, contexts=(128, 512), prefill_T=32)
K2_EXPERT_BYTES = 3 * (7168 * 2048 // 2 + 7168 * 2048 // 32 * 2)  # int4 codes + bf16 scales = 24.8 MB


def _r(x: float) -> float:
    """4 significant digits for the JSON."""
    return float(f"{x:.4g}")


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of fn() in ms, after one warm-up call, synchronising CUDA around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _mla(s: dict, dev: torch.device, dt: torch.dtype, repeats: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.1).to(dev, dt)

    H, L, R, P, V = s["H"], s["L"], s["R"], s["P"], s["V"]
    w_uk, w_uv, q, q_pe = rnd(H, P, L), rnd(H, V, L), rnd(1, H, P), rnd(1, H, R)
    out = {}
    for S in s["contexts"]:
        kv, k_pe = rnd(S, L), rnd(S, R)
        for block in (None, 4096 if S > 4096 else S // 4):
            ms = _time_ms(lambda: mla_decode(q, q_pe, kv, k_pe, w_uk, w_uv, 0.1447, S - 1, block=block), dev, repeats)
            key = f"ctx{S}" + ("" if block is None else f"_block{block}")
            out[key] = {"ms": _r(ms), "cache_gbps": _r(S * (L + R) * kv.element_size() / ms / 1e6)}
        if dev.type == "cuda":  # the same step replayed from a CUDA graph, length on the device
            pos = torch.tensor(S - 1, device=dev)
            step = GraphedStep(lambda a, b, p: mla_decode(a, b, kv, k_pe, w_uk, w_uv, 0.1447, p), q, q_pe, pos)
            out[f"ctx{S}"]["graph_ms"] = _r(_time_ms(lambda: step(q, q_pe, pos), dev, repeats))
    return out


def _int4(s: dict, dev: torch.device, dt: torch.dtype, repeats: int) -> dict:
    out, D, F = {}, s["D"], s["F"]
    rng = np.random.default_rng(0)
    for name, (O, I) in (("gate_up", (F, D)), ("down", (D, F))):
        packed = torch.from_numpy(rng.integers(-2**31, 2**31, (O, I // 8), dtype=np.int64).astype(np.int32)).to(dev)
        scale = torch.full((O, I // 32), 0.01, dtype=torch.bfloat16, device=dev)
        nbytes = packed.numel() * 4 + scale.numel() * 2
        x1 = torch.randn(1, I, device=dev, dtype=dt)
        ms = _time_ms(lambda: int4_linear(x1, packed, scale, O, I), dev, repeats)
        T = s["prefill_T"]
        xT = torch.randn(T, I, device=dev, dtype=dt)
        ms_T = _time_ms(lambda: int4_linear(xT, packed, scale, O, I), dev, repeats)
        out[f"{name}_{O}x{I}"] = {"gemv_ms": _r(ms), "gemv_gbps": _r(nbytes / ms / 1e6),
                                  f"gemm_T{T}_tflops": _r(2 * T * O * I / ms_T / 1e9)}
    return out


def _hot_moe(s: dict, dev: torch.device, repeats: int) -> dict | None:
    """One decode token's K routed pairs, all hot: the fused Triton kernel against the torch loop."""
    try:
        from kernels_gpu.int4_triton import fused_hot_moe
    except ImportError as e:
        log.warning("fused hot experts not timed: %s", e)
        return None
    D, F, K = s["D"], s["F"], s["K"]
    rng = np.random.default_rng(1)
    slots = HotSlots(K, K, D, F, device=dev)
    for e in range(K):
        ws = [DeviceInt4(torch.from_numpy(rng.integers(-2**31, 2**31, (O, I // 8), dtype=np.int64).astype(np.int32)),
                         torch.full((O, I // 32), 0.01, dtype=torch.bfloat16), O, I) for O, I in ((F, D), (F, D), (D, F))]
        slots.put(e, ws)
    x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    ids = torch.arange(K, device=dev)[None]
    w = torch.full((1, K), 1.0 / K, device=dev)
    nbytes = slots.nbytes  # K experts, each read once
    ms = _time_ms(lambda: fused_hot_moe(x, ids, w, slots.slot_of, slots.packed, slots.scale), dev, repeats)
    loop = _time_ms(lambda: hot_expert_moe(x, ids, w, slots), dev, repeats)
    return {"experts": K, "fused_ms": _r(ms), "fused_gbps": _r(nbytes / ms / 1e6), "torch_loop_ms": _r(loop)}


def _int8(dev: torch.device, dt: torch.dtype, repeats: int, O: int, I: int) -> dict:
    w = torch.randn(O, I, device=dev, dtype=dt) * 0.02
    q, sc = quantize_int8(w)
    x = torch.randn(1, I, device=dev, dtype=dt)
    ms = _time_ms(lambda: int8_linear(x, q, sc), dev, repeats)
    plain = _time_ms(lambda: int8_linear(x, q, sc, kernel="plain"), dev, repeats)
    dense = _time_ms(lambda: x @ w.T, dev, repeats)
    return {"shape": [O, I], "kernel": pick_kernel(dev.type, dt, 1), "ms": _r(ms), "gbps": _r(q.numel() / ms / 1e6),
            "dequantising_ms": _r(plain),
            f"dense_{str(dt).split('.')[-1]}_ms": _r(dense)}


def cpu_tokens_per_s(tokens: int = 64, hidden: int = 7168, inter: int = 2048, k: int = 8) -> float | None:
    """One MoE layer's CPU expert throughput at prefill (kernels_cpu.moe_forward, k experts, every token
    routed to all of them: `tokens` per expert, the density of a ~tokens*E/k-token prompt); None if the
    CPU kernels cannot run here."""
    try:
        from kernels_cpu import ExpertTable, moe_forward
        from kernels_cpu.simd import host_has_avx2
        from kernels_cpu.table import PARTS, part_shapes
    except ImportError as e:
        log.warning("CPU expert throughput not measured: %s", e)
        return None
    if not host_has_avx2():
        return None
    rng = np.random.default_rng(0)
    shapes = part_shapes(hidden, inter, 32)
    experts = [{name: (rng.integers(-2**31, 2**31, shp, dtype=np.int64).astype(np.int32) if size == 4
                       else np.full(shp, 0x3C23, np.uint16))  # bf16 0.01
                for name, (shp, size) in zip(PARTS, shapes)} for _ in range(k)]
    table = ExpertTable.from_arrays(experts, hidden, inter)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids = np.tile(np.arange(k), (tokens, 1))
    w = np.full((tokens, k), 1.0 / k, np.float32)
    moe_forward(x[:1], ids[:1], w[:1], table)  # compile / warm up
    t0 = time.perf_counter()
    moe_forward(x, ids, w, table)
    return tokens / (time.perf_counter() - t0)


def run(small: bool = False, device: str | None = None, cpu_tps: float | None = None,
        pcie_gbps: float | None = None, repeats: int = 10) -> dict:
    """All figures as a dict (see scripts/gpu_check.sh); small=True uses toy shapes (tests)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32  # bf16 matmul is ~400x slower on AVX2
    s = SMALL if small else K2
    res: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__, "dtype": str(dt).split(".")[-1], "shapes": "small" if small else "k2"}
    res["mla_decode"] = _mla(s, dev, dt, repeats)
    res["int4_expert"] = _int4(s, dev, dt, repeats)
    res["hot_moe_decode"] = _hot_moe(s, dev, repeats) if dev.type == "cuda" else None
    res["int8_linear"] = _int8(dev, dt, repeats, *((s["D"], s["H"] * s["V"])))  # o_proj [D, H*V]
    measured = measure_pcie_gbps() if dev.type == "cuda" else None
    res["pcie_gbps"] = _r(measured) if measured else None
    pcie = pcie_gbps or measured
    if cpu_tps is None and not small:
        cpu_tps = cpu_tokens_per_s()
    res["cpu_tokens_per_s_per_layer"] = _r(cpu_tps) if cpu_tps else None
    gemm = res["int4_expert"][f"gate_up_{s['F']}x{s['D']}"][f"gemm_T{s['prefill_T']}_tflops"] * 1e12
    res["offload"] = None
    if pcie and cpu_tps:
        flops = expert_flops_per_token(K2["D"], K2["F"], K2["K"])
        n = offload_threshold(PrefillSpeeds(pcie, cpu_tps, gemm), K2["E"], K2_EXPERT_BYTES, flops)
        res["offload"] = {"threshold_tokens": None if n == float("inf") else _r(n),  # None: never upload
                          "pcie_gbps": _r(pcie), "experts_touched": K2["E"], "bytes_per_expert": K2_EXPERT_BYTES,
                          "gpu_int4_tflops": _r(gemm / 1e12), "gpu_tokens_per_s_per_layer": _r(gemm / flops)}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="toy shapes (seconds on a CPU)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when present)")
    ap.add_argument("--cpu-tps", type=float, default=None, help="CPU expert tokens/s per layer (default: measure)")
    ap.add_argument("--pcie-gbps", type=float, default=None, help="use instead of measuring (CPU-only machines)")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    res = run(a.small, a.device, a.cpu_tps, a.pcie_gbps, a.repeats)
    sys.stdout.write(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
