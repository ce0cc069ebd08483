"""Smoke run of the kernel benchmark on tiny shapes: the JSON object has the keys issue 3 lists, and each derived
figure (bandwidth, share of a ceiling, FLOP/s) follows from the measured ones."""
from __future__ import annotations

import json

import pytest

from hybrid.bench.kernel_bench import run_kernel_bench


def _numbers(d: dict, keys: tuple[str, ...]) -> None:
    for k in keys:
        assert isinstance(d[k], float) and d[k] > 0, (k, d.get(k))


@pytest.fixture(scope="module")
def small_run() -> dict:
    return run_kernel_bench(small=True, threads=1)


def test_small_kernel_bench_has_every_figure(small_run):
    r = small_run
    json.dumps(r)                                          # JSON-able as the CLI prints it
    assert r["config"]["small"] is True and r["config"]["threads"] == 1
    _numbers(r, ("mem_read_gbps", "fp32_matmul_gflops"))
    _numbers(r["moe_decode"], ("ms", "gbps", "pct_of_mem_read"))
    assert set(r["moe_prefill"]) == {"16", "128", "512"}
    for entry in r["moe_prefill"].values():
        _numbers(entry, ("ms", "tokens_per_s", "gflops", "tokens_per_expert"))
    for key in ("prefill_64_per_expert", "prefill_model_density"):
        _numbers(r[key], ("ms", "gflops", "tokens_per_expert", "pct_of_fp32_matmul"))
    assert r["prefill_64_per_expert"]["tokens_per_expert"] == 64.0
    _numbers(r["dense_gemv"], ("bf16_ms", "bf16_gbps", "bf16_pct_of_mem_read", "int8_ms", "int8_gbps",
                               "int8_pct_of_mem_read", "torch_fp32_ms", "torch_fp32_gbps", "speedup"))
    assert set(r["threads"]) == {"1"}
    _numbers(r["threads"]["1"], ("mem_read_gbps", "decode_ms", "decode_gbps", "prefill_64_per_expert_gflops"))
    torch_peer = r["peers"]["torch_int4pack"]
    _numbers(torch_peer["decode"], ("ms", "gbps"))
    _numbers(torch_peer["prefill_16"], ("ms", "tokens_per_s", "gflops"))
    kt = r["peers"]["ktransformers"]
    assert isinstance(kt["available"], bool) and (kt["available"] or kt["reason"])


def test_kernel_bench_figures_follow_from_each_other(small_run):
    """Each derived figure recomputed from the returned ones: bandwidth = bytes read / time, a share =
    figure / its ceiling, FLOP/s = 6 D I (tokens x top-k) / time (gate, up and down: 2 FLOPs per weight)."""
    r = small_run
    c = r["config"]
    D, I, E, K = c["hidden"], c["inter"], c["experts"], c["topk"]
    decode_bytes = K * c["expert_mb"] * 1e6  # one token reads its top-K experts

    def gbps(nbytes, ms):
        return nbytes / (ms / 1e3) / 1e9

    dec = r["moe_decode"]
    assert dec["gbps"] == pytest.approx(gbps(decode_bytes, dec["ms"]), rel=1e-9)
    g = r["dense_gemv"]  # bf16 weights read as 2 bytes each, int8 as 1 (and a bf16 scale a row), fp32 copies as 4
    O, In = g["shape"]
    assert g["bf16_gbps"] == pytest.approx(gbps(2 * O * In, g["bf16_ms"]), rel=1e-9)
    assert g["int8_gbps"] == pytest.approx(gbps(O * (In + 2), g["int8_ms"]), rel=1e-9)
    assert g["int8_pct_of_mem_read"] == pytest.approx(100 * g["int8_gbps"] / r["mem_read_gbps"], rel=1e-9)
    if g["int8_tiles_ms"] is not None:  # the same codes as int8tiles' tiles: the same bytes
        assert g["int8_tiles_gbps"] == pytest.approx(gbps(O * (In + 2), g["int8_tiles_ms"]), rel=1e-9)
        assert g["int8_tiles_pct_of_mem_read"] == pytest.approx(100 * g["int8_tiles_gbps"] / r["mem_read_gbps"],
                                                                rel=1e-9)
    assert g["torch_fp32_gbps"] == pytest.approx(gbps(4 * O * In, g["torch_fp32_ms"]), rel=1e-9)
    assert g["speedup"] == pytest.approx(g["torch_fp32_ms"] / g["bf16_ms"], rel=1e-9)
    assert g["bf16_pct_of_mem_read"] == pytest.approx(100 * g["bf16_gbps"] / r["mem_read_gbps"], rel=1e-9)
    assert dec["pct_of_mem_read"] == pytest.approx(100 * dec["gbps"] / r["mem_read_gbps"], rel=1e-9)
    assert dec["ms_median"] >= dec["ms"]  # the best of the same runs
    one = r["threads"]["1"]
    assert one["decode_gbps"] == pytest.approx(gbps(decode_bytes, one["decode_ms"]), rel=1e-9)
    assert one["decode_pct_of_mem_read"] == pytest.approx(100 * one["decode_gbps"] / one["mem_read_gbps"], rel=1e-9)
    for T, entry in r["moe_prefill"].items():
        T = int(T)
        s = entry["ms"] / 1e3
        assert entry["tokens_per_s"] == pytest.approx(T / s, rel=1e-9)
        assert entry["gflops"] == pytest.approx(6 * D * I * T * K / s / 1e9, rel=1e-9)
        assert entry["tokens_per_expert"] == T * K / E
    for key, experts in (("prefill_64_per_expert", E), ("prefill_model_density", r["prefill_model_density"]["experts"])):
        entry = r[key]
        assert entry["pct_of_fp32_matmul"] == pytest.approx(100 * entry["gflops"] / r["fp32_matmul_gflops"], rel=1e-9)
        T = round(entry["tokens_per_expert"] * experts / K)
        assert entry["gflops"] == pytest.approx(6 * D * I * T * K / (entry["ms"] / 1e3) / 1e9, rel=1e-9)
    assert r["prefill_64_per_expert"]["tokens_per_expert"] == 64.0
    assert r["prefill_model_density"]["tokens_per_expert"] == 512 * K / r["prefill_model_density"]["experts"]
    peer = r["peers"]["torch_int4pack"]
    assert peer["decode"]["gbps"] == pytest.approx(gbps(decode_bytes, peer["decode"]["ms"]), rel=1e-9)
    assert peer["prefill_16"]["tokens_per_s"] == pytest.approx(16 / (peer["prefill_16"]["ms"] / 1e3), rel=1e-9)
