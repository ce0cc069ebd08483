"""`kimi-hybrid bench`: prompt processing and generation speed of a loaded Engine, as a user sees it.

Owns the measurement only: several runs of (prefill P random tokens, decode G tokens), the time split
by component from Engine.stats(), bytes per token and the bandwidth achieved against the RAM read
bandwidth measured in the same run. Returns one JSON-able dict whose schema is docs/bench_schema.md
(SCHEMA names its version); rendering lives in the CLI.
"""
from __future__ import annotations

import itertools
import os
import statistics
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from hybrid.bench.account import account
from hybrid.bench.in_place import by_component, in_place_gbps
from hybrid.runtime.token_loop import greedy
from hybrid.runtime.tensor_classes import GPU_SIDE
from hybrid.runtime.probe import GB, host_steal_s, mem_read_gbps, probe_buffer

if TYPE_CHECKING:
    from hybrid.runtime.engine import Engine

SCHEMA = "kimi-hybrid.bench/2"
# the split's keys (ms per token) <- Engine.stats() seconds; all but 'unaccounted' come from there
SPLIT = {"gpu_side": "gpu_side_s", "experts_compute": "experts_compute_s", "experts_wait": "experts_wait_s",
         "io_wait": "io_wait_s", "overhead": "overhead_s"}
SUMMED = (*SPLIT.values(), "forward_s", "expert_bytes", "bytes_read", "attention_s", "attention_proj_s", "router_s",
          "shared_s", "dense_s", "lm_head_s", "sampling_s")


# Where each run's prompt starts: two leading tokens from a counter no run in this process repeats (from
# a random point, so that processes sharing a disk prefix tier do not meet either), so that no run can be
# served from the KV store. Each call once drew its first tokens from its seed and run index alone:
# compare_llamacpp's warm-up call (seed 0) left round 1's prompt in the store, and round 1 measured a
# one-token prefill as its "prompt processing" (k2-slice, 2-core Xeon: 10 tok/s beside 88-93).
_STARTS = itertools.count(int.from_bytes(os.urandom(8), "little"))


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _token_ms(token_s: list[float]) -> dict[str, float]:
    """One generated token's wall time over every run: median, mean, 90th percentile and max (ms). On a
    VM the mean carries stalls from outside the engine (k2-slice, 2-core Xeon, the probe's buffer freed
    between runs: median 58.1, mean 61.3, max 127-146 ms, each long token with the host's steal; see
    probe_buffer and _steal_report); the median is the engine's typical token."""
    ms = np.array(token_s) * 1e3
    return {"median": float(np.median(ms)), "mean": float(ms.mean()), "p90": float(np.percentile(ms, 90)),
            "max": float(ms.max())}


def _steal_report(steal_s: list[float] | None, token_s: list[float], nbytes: float, mem_gbps: float) -> dict | None:
    """The host's steal over the decoded tokens (docs/bench_schema.md, decode.host_steal), with the share of
    the probe over the tokens it missed (nbytes a token), or None where the system does not report it."""
    if not steal_s:  # None (not reported) or no decoded tokens
        return None
    clean = [t for t, s in zip(token_s, steal_s) if s == 0]
    return {"ms_per_token": 1e3 * sum(steal_s) / len(steal_s), "tokens_hit": len(steal_s) - len(clean),
            "tokens": len(steal_s),
            "pct_of_mem_read_without": 100 * nbytes * len(clean) / sum(clean) / GB / mem_gbps if clean else None}


class _Phase:
    """One phase (prefill or decode) summed over the runs: wall time, tokens, Engine.stats() counters."""

    def __init__(self) -> None:
        self.tok_s: list[float] = []
        self.wall_s = 0.0
        self.tokens = 0
        self.sums = dict.fromkeys(SUMMED, 0.0)
        self.hits = self.misses = 0
        self.cache = False
        self.cluster: dict | None = None  # Engine.stats()['cluster'] summed over the runs (several machines)
        self.kv_read = 0  # KV-cache bytes the attention read, summed over the runs
        self.kv: dict = {}  # the last run's Engine.stats()['kv'] (pages, reuse counts)
        self.token_s: list[float] = []  # decode: each generated token's own wall time, over the runs
        self.steal_s: list[float] | None = []  # decode: the host's steal during each token (None: not known)

    def add(self, tokens: int, wall_s: float, stats: dict, token_s: list[float] | None = None,
            steal_s: list[float] | None = None) -> None:
        self.tok_s.append(tokens / wall_s)
        self.token_s += token_s or []
        self.steal_s = None if steal_s is None or self.steal_s is None else self.steal_s + steal_s
        self.tokens += tokens
        self.wall_s += wall_s
        for k in SUMMED:
            self.sums[k] += stats[k]
        if stats["cache"] is not None:
            self.cache = True
            self.hits += stats["cache"]["hits"]
            self.misses += stats["cache"]["misses"]
        if stats.get("cluster") is not None:
            self.cluster = _add_cluster(self.cluster, stats["cluster"])
        self.kv_read += stats["kv"]["kv_bytes_read"]
        self.kv = stats["kv"]

    def per_token(self, key: str) -> float:
        return self.sums[key] / self.tokens

    def split(self) -> dict[str, float]:
        out = {k: 1e3 * self.per_token(src) for k, src in SPLIT.items()}
        out["unaccounted"] = 1e3 * max(0.0, self.wall_s - self.sums["forward_s"]) / self.tokens
        return out


NODE_SUMS = ("experts", "compute_s", "expert_bytes", "disk_bytes", "wait_s", "network_s")


def _add_cluster(acc: dict | None, st: dict) -> dict:
    """acc + one run's cluster figures (ClusterExperts.stats()['cluster']): counters summed, the rest the latest."""
    if acc is None:
        return {**st, "nodes": [dict(n) for n in st["nodes"]]}
    out = {**st, **{k: acc[k] + st[k] for k in ("layer_calls", "wait_s", "overhead_s")}}
    a, b = acc["balance"], st["balance"]  # per-call averages: weighted by each run's calls
    n = a["layer_calls"] + b["layer_calls"]
    out["balance"] = {k: (a["layer_calls"] * (a[k] or 0) + b["layer_calls"] * (b[k] or 0)) / n if n else None
                      for k in a if k != "layer_calls"} | {"layer_calls": n}
    out["nodes"] = [{**b, **{k: a[k] + b[k] for k in NODE_SUMS}} for a, b in zip(acc["nodes"], st["nodes"])]
    return out


def _cluster_report(c: dict | None, tokens: int, wall_s: float) -> dict | None:
    """Per decoded token: the nodes' work and the time the network added (docs/bench_schema.md, decode.cluster)."""
    if c is None:
        return None
    per = {"experts_per_token": ("experts", 1), "compute_ms_per_token": ("compute_s", 1e3),
           "network_ms_per_token": ("network_s", 1e3), "wait_ms_per_token": ("wait_s", 1e3),
           "expert_bytes_per_token": ("expert_bytes", 1), "disk_bytes_per_token": ("disk_bytes", 1)}
    return {"world": c["world"], "lost": c["lost"], "experts_per_rank": c["experts_per_rank"],
            "held_per_rank": c["held_per_rank"], "gbps_per_rank": c["gbps_per_rank"],
            "balance": {k: v for k, v in c["balance"].items() if k != "layer_calls"},
            "layer_calls_per_token": c["layer_calls"] / tokens,
            "overhead_ms_per_moe_layer": 1e3 * c["overhead_s"] / c["layer_calls"] if c["layer_calls"] else None,
            "network_ms_per_token": 1e3 * c["overhead_s"] / tokens, "network_share": c["overhead_s"] / wall_s,
            "wait_ms_per_token": 1e3 * c["wait_s"] / tokens,
            "nodes": {k: [n[src] * scale / tokens for n in c["nodes"]] for k, (src, scale) in per.items()}}


def weight_bytes_per_token(engine: Engine) -> int:
    """Non-expert weights one decoded token reads: the GPU side as placed (the embedding is one row)."""
    return sum(e.nbytes for e in engine.plan.entries if e.what in GPU_SIDE)


def bench_engine(engine: Engine, prompt_tokens: int, gen_tokens: int, runs: int, *, mem_gbps: float | None = None,
                 probe_bytes: int = 1 << 30, seed: int = 0, warmup: bool = True, name: str | None = None,
                 backend: str = "auto", on_run: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Measure `runs` x (prefill `prompt_tokens`, decode `gen_tokens`) and return the schema's dict.

    Each run's prompt starts with two tokens no earlier run in this process started with (_STARTS), so the
    engine's KV prefix reuse cannot skip work, whatever the seed; seed draws the rest of the prompts.
    mem_gbps: the RAM read bandwidth if already measured; else probed here over `probe_bytes` before the
    runs and after each, and the best probe taken (all of them in the report's machine.mem_read_gbps_probes);
    beside each probe a token's own bytes read in place, and after the runs each component's (in_place.py).
    on_run(r) is called after measured run r (0-based), for progress display.
    """
    if prompt_tokens < 1 or gen_tokens < 2 or runs < 1:
        raise ValueError("bench needs --prompt-tokens >= 1, --gen-tokens >= 2 and --runs >= 1")
    if prompt_tokens + gen_tokens > engine.context:
        raise ValueError(f"--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} exceed the context of "
                         f"{engine.context} tokens; lower them or pass --context")
    rng = np.random.default_rng(seed)
    prefill, decode = _Phase(), _Phase()
    if warmup:  # compile the kernels, fault the weights in and build the measured prompt's products once,
        # on both the prefill and the decode path, as llama-bench warms up each test (a 16-token warm-up
        # left the first measured 128-token prompt paying for its shapes: AVX2 code, 27.1 tok/s, then 37)
        _run(engine, rng, runs, prompt_tokens, 2)
    # here: before the runs and after each, over one buffer held until the last (probe_buffer: why), and a
    # token's own bytes read in place beside each (in_place.py: why)
    buf = None if mem_gbps is not None else _probe_buffer(probe_bytes)
    draws = np.random.default_rng(seed + 1)
    probes = None if buf is None else [mem_read_gbps(buf=buf)]
    in_place = None if buf is None else [in_place_gbps(engine, draws)]
    for r in range(runs):
        _run(engine, rng, r, prompt_tokens, gen_tokens, (prefill, decode))
        if probes is not None:
            probes.append(mem_read_gbps(buf=buf))
            in_place.append(in_place_gbps(engine, draws))
        if on_run:
            on_run(r)
    parts = None if buf is None else by_component(engine, draws, buf)
    del buf
    settings = {"backend": backend, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "runs": runs}
    report = _report(engine, name, settings, mem_gbps if probes is None else max(probes), prefill, decode)
    report["machine"]["mem_read_gbps_probes"] = probes
    report["decode"]["pct_of_mem_read_paired"] = _paired_share(report["decode"], probes)
    _add_in_place(report, in_place, parts)
    return report


def _add_in_place(report: dict, figures: list[float | None] | None, parts: dict[str, float] | None) -> None:
    """machine.mem_read_gbps_in_place (the best of the in-place reads; each in ..._in_place_reads),
    decode.pct_of_in_place, and each decode component's in-place GB/s and share of it (in_place.by_component):
    null where there were none (the caller's bandwidth, a small model, a GPU side, or no local mapped experts),
    the components' too."""
    got = [g for g in figures or () if g is not None]
    best = max(got) if got else None
    parts = parts if best else None
    report["machine"]["mem_read_gbps_in_place"] = best
    report["machine"]["mem_read_gbps_in_place_reads"] = figures if got else None
    dec = report["decode"]
    dec["pct_of_in_place"] = 100 * dec["achieved_gbps"] / best if best else None
    for what, c in dec["components"].items():
        g = (parts or {}).get(what)
        c["in_place_gbps"] = g
        c["pct_of_in_place"] = 100 * c["gbps"] / g if g and c["gbps"] is not None else None


def _paired_share(dec: dict, probes: list[float] | None) -> float | None:
    """Each run's decode bandwidth (bytes a token x its tok/s) as a percentage of the mean of the probes
    either side of it (before the run, after it), the median over the runs; None without probes. The
    headline divides by the best probe, which a fast moment of a VM's host can set: k2-slice bf16w on a
    2-core Xeon VM, probes 40.3 (before the runs), 35.8, 35.7, 35.2 GB/s: 75.7% against the best, 86.1%
    against the probes beside each run."""
    if probes is None:
        return None
    return statistics.median(100 * dec["bytes_per_token"] * tps / GB / ((probes[r] + probes[r + 1]) / 2)
                             for r, tps in enumerate(dec["runs_tok_s"]))


def _probe_buffer(probe_bytes: int) -> np.ndarray:
    """The RAM probe's buffer (probe_buffer), held for the bench's probes. A VM's bandwidth can move by a third
    within minutes, so the bench probes between its runs and measures against the best: a percentage of it
    is never flattered by a slow moment of the probe."""
    try:
        return probe_buffer(probe_bytes)
    except MemoryError:
        raise MemoryError(f"the RAM bandwidth probe could not allocate its {probe_bytes >> 20:,} MB buffer; "
                          "use a smaller --probe-mb") from None


def _run(engine: Engine, rng: np.random.Generator, r: int, P: int, G: int,
         record: tuple[_Phase, _Phase] | None = None) -> None:
    """One run r: prefill P random tokens, decode G; into record's (prefill, decode) phases if given."""
    n_ids = engine.tokenizer.n_ranks  # ordinary tokens only
    prompt = rng.integers(0, n_ids, P).tolist()
    start = next(_STARTS)
    prompt[:2] = [start % n_ids, start // n_ids % n_ids][:P]  # a start no earlier run had: nothing to reuse
    engine.reset_stats()
    it = engine.generate(prompt, G, sampler=greedy, stop_ids=frozenset())
    first = next(it)  # the prefill forward and the first sampled token
    if first.prefill_tokens != P:
        it.close()
        raise RuntimeError(f"bench run {r}: {P - first.prefill_tokens} of the prompt's {P} tokens came from the "
                           "KV store; a run must prefill its whole prompt (run the bench in a fresh engine)")
    pre = engine.stats()
    engine.reset_stats()
    last, times = first, []
    steal, stolen = host_steal_s(), []  # one read of /proc/stat a token: ~0.05 ms (host_steal_s)
    for tok in it:
        times.append(tok.elapsed_s - last.elapsed_s)
        last = tok
        if steal is not None:
            now = host_steal_s()
            stolen.append(now - steal)
            steal = now
    if record is not None:
        record[0].add(first.prefill_tokens, first.elapsed_s, pre)
        record[1].add(len(times), last.elapsed_s - first.elapsed_s, engine.stats(), times,
                      None if steal is None else stolen)


def _report(engine: Engine, name: str | None, settings: dict, mem_gbps: float, prefill: _Phase,
            decode: _Phase) -> dict[str, Any]:
    """The schema's dict (docs/bench_schema.md) from the measured phases."""
    cfg = engine.config
    graphs = engine.stats()["decode_graphs"]
    experts = decode.per_token("expert_bytes")
    weights = weight_bytes_per_token(engine)
    achieved = (experts + weights) * statistics.median(decode.tok_s) / GB
    token_ms = _token_ms(decode.token_s)
    at_median = (experts + weights) / (token_ms["median"] / 1e3) / GB  # GB/s at the median token
    compute = decode.sums["experts_compute_s"]
    decode_split = decode.split()
    hits, misses = prefill.hits + decode.hits, prefill.misses + decode.misses
    chunks = -(-settings["prompt_tokens"] // (engine.prefill_chunk or settings["prompt_tokens"]))  # passes a prompt takes
    return {
        "schema": SCHEMA,
        "model": {"name": name or engine.checkpoint.path.name, "path": str(engine.checkpoint.path),
                  "layers": cfg.num_hidden_layers, "moe_layers": len(cfg.moe_layers),
                  "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok},
        "machine": {"cpu_threads": engine.plan.cpu_threads, "mem_read_gbps": mem_gbps,
                    "loadavg_1min": os.getloadavg()[0]},
        "settings": {**settings, "context": engine.context, "expert_mode": engine.plan.expert_mode,
                     "hot_experts": engine.hot_experts, "gpu_precision": engine.plan.gpu_precision,
                     "cpu_prompt_math": engine.model.prompt_math,
                     "decode_graphs": "off" if graphs is None else graphs["mode"] + ("+cuda_graphs" if graphs["cuda_graphs"] else "")},
        "prefill": {"tok_s": _spread(prefill.tok_s), "runs_tok_s": prefill.tok_s, "split_ms_per_token": prefill.split(),
                    "expert_bytes_per_token": prefill.per_token("expert_bytes"),
                    "components": account(engine, prefill.sums, prefill.tokens, len(prefill.tok_s) * chunks,
                                          prefill.wall_s, settings["prompt_tokens"], mem_gbps)},
        "decode": {"tok_s": _spread(decode.tok_s), "runs_tok_s": decode.tok_s, "split_ms_per_token": decode_split,
                   "expert_bytes_per_token": experts, "weight_bytes_per_token": weights,
                   "bytes_per_token": experts + weights, "achieved_gbps": achieved,
                   "pct_of_mem_read": 100 * achieved / mem_gbps,
                   "token_ms": token_ms,
                   "pct_of_mem_read_median_token": 100 * at_median / mem_gbps,
                   "host_steal": _steal_report(decode.steal_s, decode.token_s, experts + weights, mem_gbps),
                   "expert_kernel_gbps": decode.sums["expert_bytes"] / compute / GB if compute > 0 else None,
                   "disk_bytes_per_token": decode.per_token("bytes_read"),
                   "per_moe_layer_ms": {k: decode_split[k] / max(1, len(cfg.moe_layers))
                                        for k in ("gpu_side", "experts_compute", "experts_wait")},
                   "overlap_efficiency": max(0.0, 1 - decode.sums["experts_wait_s"] / compute) if compute > 0 else None,
                   "components": account(engine, decode.sums, decode.tokens, decode.tokens, decode.wall_s,
                                         settings["prompt_tokens"] + settings["gen_tokens"] / 2, mem_gbps),
                   "cluster": _cluster_report(decode.cluster, decode.tokens, decode.wall_s),
                   "kv_bytes_read_per_token": decode.kv_read / decode.tokens},
        "kv": {k: prefill.kv.get(k, 0) + decode.kv.get(k, 0) for k in ("requests", "prompt_tokens", "reused_tokens")}
        | {k: decode.kv.get(k) for k in ("page_size", "pages", "spill_pages", "bytes")},
        "cache": ({"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else None}
                  if prefill.cache or decode.cache else None),
    }
