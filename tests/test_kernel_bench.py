"""Smoke run of the kernel benchmark on tiny shapes: the JSON object has the keys issue 3 lists."""
from __future__ import annotations

import json

from hybrid.kernel_bench import run_kernel_bench


def _numbers(d: dict, keys: tuple[str, ...]) -> None:
    for k in keys:
        assert isinstance(d[k], float) and d[k] > 0, (k, d.get(k))


def test_small_kernel_bench_has_every_figure():
    r = run_kernel_bench(small=True, threads=1)
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
    assert set(r["threads"]) == {"1"}
    _numbers(r["threads"]["1"], ("mem_read_gbps", "decode_ms", "decode_gbps", "prefill_64_per_expert_gflops"))
    torch_peer = r["peers"]["torch_int4pack"]
    _numbers(torch_peer["decode"], ("ms", "gbps"))
    _numbers(torch_peer["prefill_16"], ("ms", "tokens_per_s", "gflops"))
    kt = r["peers"]["ktransformers"]
    assert isinstance(kt["available"], bool) and (kt["available"] or kt["reason"])
