"""`kimi-hybrid bench`: prompt processing and generation speed of a loaded Engine, as a user sees it.

Owns the measurement only: several runs of (prefill P random tokens, decode G tokens), the time split
by component from Engine.stats(), bytes per token and the bandwidth achieved against the RAM read
bandwidth measured in the same run. Returns one JSON-able dict whose schema is docs/bench_schema.md
(SCHEMA names its version); rendering lives in the CLI.
"""
from __future__ import annotations

import os
import statistics
from typing import Any, Callable

import numpy as np

from .generate import greedy
from .layout import size_report
from .placement import GPU_SIDE
from .probe import GB, mem_read_gbps

SCHEMA = "kimi-hybrid.bench/1"
# Engine.stats() seconds -> the split's keys (ms per token)
SPLIT = {"gpu_side": "gpu_side_s", "experts_compute": "experts_compute_s", "experts_wait": "experts_wait_s",
         "io_wait": "io_wait_s", "overhead": "overhead_s"}


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _add(total: dict, s: dict) -> None:
    for k, v in s.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            total[k] = total.get(k, 0) + v
        elif k == "cache" and isinstance(v, dict):
            for ck in ("hits", "misses"):
                total[f"cache_{ck}"] = total.get(f"cache_{ck}", 0) + int(v.get(ck) or 0)
            total["cache_on"] = True


def _split(total: dict | None, wall_s: float, tokens: int) -> dict[str, float] | None:
    """ms per token per component; 'unaccounted' is wall time outside Engine.stats' forward_s."""
    if total is None or tokens == 0:
        return None
    out = {k: 1e3 * total.get(src, 0.0) / tokens for k, src in SPLIT.items()}
    out["unaccounted"] = 1e3 * max(0.0, wall_s - total.get("forward_s", 0.0)) / tokens
    return out


def weight_bytes_per_token(engine) -> int:
    """Non-expert weights one decoded token reads (the GPU side; the embedding is one row, not counted)."""
    plan = getattr(engine, "plan", None)
    if plan is not None:
        return sum(e.nbytes for e in plan.entries if e.what in GPU_SIDE)
    return sum(t.nbytes for k, t in engine.model.w.items() if not k.startswith("model.embed_tokens."))


def bench_engine(engine, prompt_tokens: int, gen_tokens: int, runs: int, *, mem_gbps: float | None = None,
                 probe_bytes: int = 1 << 30, seed: int = 0, warmup: bool = True, name: str | None = None,
                 backend: str = "auto",
                 on_run: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Measure `runs` x (prefill `prompt_tokens`, decode `gen_tokens`) and return the schema's dict.

    Each run's prompt starts with a different token, so the engine's KV prefix reuse cannot skip work.
    mem_gbps: the RAM read bandwidth if already measured; else probed here over `probe_bytes`.
    """
    cfg = engine.config
    if prompt_tokens < 1 or gen_tokens < 2 or runs < 1:
        raise ValueError("bench needs --prompt-tokens >= 1, --gen-tokens >= 2 and --runs >= 1")
    if prompt_tokens + gen_tokens > engine.context:
        raise ValueError(f"--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} exceed the context of "
                         f"{engine.context} tokens; lower them or pass --context")
    stats: Callable[[], dict] | None = getattr(engine, "stats", None)
    reset: Callable[[], None] = getattr(engine, "reset_stats", None) or (lambda: None)
    n_ids = engine.tokenizer.n_ranks
    rng = np.random.default_rng(seed)

    def one(r: int, P: int, G: int) -> dict:
        prompt = rng.integers(0, n_ids, P).tolist()
        prompt[0] = r % n_ids  # never the previous run's first token: nothing to reuse
        reset()
        it = engine.generate(prompt, G, sampler=greedy, stop_ids=frozenset())
        first = next(it)
        pre = stats() if stats else None
        reset()
        last, n = first, 1
        for last in it:
            n += 1
        dec = stats() if stats else None
        return {"prefill_tokens": first.prefill_tokens, "prefill_s": first.elapsed_s, "prefill_stats": pre,
                "decode_tokens": n - 1, "decode_s": last.elapsed_s - first.elapsed_s, "decode_stats": dec}

    if warmup:  # compile the kernels and fault the weights in, on both the prefill and the decode path
        one(runs, min(prompt_tokens, 16), 2)
    if mem_gbps is None:
        mem_gbps = mem_read_gbps(probe_bytes)
    results = []
    for r in range(runs):
        results.append(one(r, prompt_tokens, gen_tokens))
        if on_run:
            on_run(r, results[-1])

    totals: dict[str, dict | None] = {}
    for phase in ("prefill", "decode"):
        t: dict | None = {} if stats else None
        for res in results:
            if t is not None and res[f"{phase}_stats"] is not None:
                _add(t, res[f"{phase}_stats"])
        totals[phase] = t

    pre_tok = sum(r["prefill_tokens"] for r in results)
    dec_tok = sum(r["decode_tokens"] for r in results)
    dec_tps = [r["decode_tokens"] / r["decode_s"] for r in results]
    pre_tps = [r["prefill_tokens"] / r["prefill_s"] for r in results]

    def expert_bytes(phase: str, tokens: int) -> float | None:
        t = totals[phase]
        return t["expert_bytes"] / tokens if t and "expert_bytes" in t and tokens else None

    reported = expert_bytes("decode", dec_tok)
    per_token_experts = reported if reported is not None else size_report(cfg).expert_bytes_per_token
    weights = weight_bytes_per_token(engine)
    bpt = per_token_experts + weights
    achieved = bpt * statistics.median(dec_tps) / GB
    dt = totals["decode"] or {}
    kernel = (per_token_experts * dec_tok / dt["experts_compute_s"] / GB) if dt.get("experts_compute_s") else None
    cache = None
    all_stats: dict = {}
    for phase in ("prefill", "decode"):
        _add(all_stats, totals[phase] or {})
    if all_stats.get("cache_on"):
        h, m = all_stats.get("cache_hits", 0), all_stats.get("cache_misses", 0)
        cache = {"hits": h, "misses": m, "hit_rate": h / (h + m) if h + m else None}
    plan = getattr(engine, "plan", None)
    return {
        "schema": SCHEMA,
        "model": {"name": name or engine.checkpoint.path.name, "path": str(engine.checkpoint.path), "layers": cfg.num_hidden_layers,
                  "moe_layers": len(cfg.moe_layers), "routed_experts": cfg.n_routed_experts,
                  "experts_per_token": cfg.num_experts_per_tok},
        "machine": {"cpu_threads": getattr(plan, "cpu_threads", None) or len(os.sched_getaffinity(0)),
                    "mem_read_gbps": mem_gbps, "loadavg_1min": os.getloadavg()[0]},
        "settings": {"backend": backend, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "runs": runs,
                     "context": engine.context, "expert_mode": getattr(plan, "expert_mode", None),
                     "stats": stats is not None},
        "prefill": {"tok_s": _spread(pre_tps), "runs_tok_s": pre_tps,
                    "split_ms_per_token": _split(totals["prefill"], sum(r["prefill_s"] for r in results), pre_tok),
                    "expert_bytes_per_token": expert_bytes("prefill", pre_tok)},
        "decode": {"tok_s": _spread(dec_tps), "runs_tok_s": dec_tps,
                   "split_ms_per_token": _split(totals["decode"], sum(r["decode_s"] for r in results), dec_tok),
                   "expert_bytes_per_token": per_token_experts, "weight_bytes_per_token": weights,
                   "bytes_per_token": bpt, "achieved_gbps": achieved, "pct_of_mem_read": 100 * achieved / mem_gbps,
                   "expert_kernel_gbps": kernel,
                   "disk_bytes_per_token": dt["bytes_read"] / dec_tok if "bytes_read" in dt else None},
        "cache": cache,
    }
