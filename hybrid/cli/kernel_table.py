"""`bench --kernels` as a table people read: hybrid.bench.kernel_bench's dict (whose keys `--json` keeps) with
a title for each section and words and units for each figure. A key not named here is shown in words
(underscores as spaces), never dropped.
"""
from __future__ import annotations

from typing import Any, Iterator

from rich.table import Table
from rich.text import Text

SECTIONS = {
    "config": "the run",
    "mem_read_gbps": "RAM read bandwidth, measured in this run (GB/s)",
    "moe_decode": "routed experts, decode (1 token, top-k experts)",
    "dense_gemv": "a GPU-side product on the CPU (bf16 and int8 weights, int8 in rows and tiles, one token)",
    "moe_prefill": "routed experts, prefill (prompt tokens at once)",
    "fp32_matmul_gflops": "torch fp32 matmul 512 x hidden x inter (GFLOP/s)",
    "prefill_64_per_expert": "routed experts, prefill at 64 tokens per expert",
    "prefill_model_density": "routed experts, prefill at the real model's density (512 tokens)",
    "threads": "one thread against all",
    "peers": "other kernels on the same experts",
}
FIELDS = {
    "hidden": "hidden size", "inter": "expert intermediate size", "group": "INT4 group size", "experts": "experts",
    "topk": "experts per token", "threads": "CPU threads", "small": "small shapes (a smoke run)",
    "expert_mb": "one expert (MB)", "working_set_mb": "all experts (MB)", "activations": "activations",
    "host_cpu": "CPU (LLVM's name)", "host_avx512": "AVX-512", "loadavg_1min": "load average (1 min)",
    "other_processes_cpu_pct": "CPU taken by other processes (%)",
    "ms": "time (ms)", "ms_median": "time, median (ms)", "gbps": "bandwidth (GB/s)", "tokens_per_s": "tokens/s",
    "gflops": "GFLOP/s", "tokens_per_expert": "tokens per expert", "mem_read_gbps": "RAM read bandwidth (GB/s)",
    "pct_of_mem_read": "share of the RAM bandwidth (%)",
    "pct_of_mem_read_paired_median": "share of the RAM bandwidth, paired median (%)",
    "pct_of_fp32_matmul": "share of torch's fp32 matmul (%)", "shape": "weight shape [out, in]",
    "bf16_ms": "bf16 GEMV time (ms)", "bf16_gbps": "bf16 GEMV bandwidth (GB/s)",
    "int8_ms": "int8 GEMV time (ms)", "int8_gbps": "int8 GEMV bandwidth (GB/s)",
    "bf16_pct_of_mem_read": "bf16 GEMV share of the RAM bandwidth (%)",
    "int8_pct_of_mem_read": "int8 GEMV share of the RAM bandwidth (%)",
    "int8_tiles_ms": "int8 GEMV over tiles time (ms)", "int8_tiles_gbps": "int8 GEMV over tiles bandwidth (GB/s)",
    "int8_tiles_pct_of_mem_read": "int8 GEMV over tiles share of the RAM bandwidth (%)",
    "torch_fp32_ms": "torch fp32 GEMV time (ms)",
    "torch_fp32_gbps": "torch fp32 GEMV bandwidth (GB/s)", "speedup": "bf16 GEMV speed-up over torch fp32",
    "decode_ms": "decode time (ms)", "decode_gbps": "decode bandwidth (GB/s)",
    "decode_pct_of_mem_read": "decode share of the RAM bandwidth (%)",
    "prefill_64_per_expert_gflops": "prefill at 64 tokens per expert (GFLOP/s)",
    "torch_int4pack": "torch int4pack", "ktransformers": "KTransformers AVX2RawInt4_MOE", "decode": "decode",
    "prefill_16": "prefill, 16 tokens", "available": "available", "reason": "why not",
}


def words(key: str, section: str) -> str:
    """One key as words: a number is a count of threads (section 'threads') or of tokens."""
    if key.isdigit():
        return f"{key} thread{'s' if key != '1' else ''}" if section == "threads" else f"{key} tokens"
    return FIELDS.get(key, key.replace("_", " "))


def value_text(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"  # 0.0669 ms, not 0.07
    if isinstance(v, list):
        return " x ".join(str(x) for x in v)
    return str(v)


def _leaves(d: dict, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, (*path, k))
        else:
            yield (*path, k), v


def kernel_table(result: dict) -> Table:
    """Sections as bold rows, their figures indented beneath: 'routed experts, prefill' / '  128 tokens: time (ms)'."""
    t = Table(title="CPU expert kernels", title_justify="left")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for section, v in result.items():
        title = SECTIONS.get(section, section.replace("_", " "))
        if not isinstance(v, dict):
            t.add_row(Text(title, style="bold"), value_text(v))
            continue
        t.add_row(Text(title, style="bold"), "")
        for path, leaf in _leaves(v):
            t.add_row(Text("  " + ": ".join(words(k, section) for k in path)), value_text(leaf))
    return t
