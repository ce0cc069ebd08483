"""Figures for the paged KV store (README "How conversations are kept"), as JSON on stdout.

- interleave: N agent conversations of T turns taking turns on one engine; prefilled tokens per turn
  and wall time. Only public API, so the same script measures an older checkout (PYTHONPATH=that tree).
- attention: one decode step of the model over a cache filled with random rows at each context length:
  the contiguous fp32 cache (the previous layout), paged fp32 pages and paged bf16 pages (the default),
  plus bf16 pages with 75% of them in the host tier. Internal API (this tree only).

  python scripts/bench_kv.py interleave --model k2-slice --convs 2 4 --turns 10
  python scripts/bench_kv.py attention --model k2-slice --contexts 1024 8192 32768
  python scripts/bench_kv.py restart --model tiny --tokens 16384
- restart: a conversation, the engine closed, a new one on the same --prefix-cache-dir, the next turn.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

import hybrid


def interleave(model: str, convs: list[int], turns: int, new_tokens: int, answer: int) -> list[dict]:
    out = []
    for n in convs:
        eng = hybrid.load(model, device="cpu", context=8192)
        rng, V = np.random.default_rng(n), min(30000, eng.config.vocab_size - 1)
        histories = [rng.integers(10, V, 200).tolist() for _ in range(n)]
        prefilled, t0 = [], time.perf_counter()
        for _ in range(turns):
            for h in histories:
                h += rng.integers(10, V, new_tokens).tolist()
                steps = list(eng.generate(h, answer, sampler=lambda lg: int(lg.argmax())))
                prefilled.append(steps[0].prefill_tokens)
                h += [s.token for s in steps]
        wall = time.perf_counter() - t0
        out.append({"conversations": n, "turns": turns, "prefilled_tokens": sum(prefilled),
                    "prefilled_per_turn_after_the_first": statistics.mean(prefilled[n:]), "wall_s": wall})
        eng.close()
    return out


def restart(model: str, tokens: int, new_tokens: int, directory: str) -> dict:
    """A conversation of `tokens` tokens, the engine closed (its prefixes saved to `directory`), a new
    engine on the same directory, the next turn: how much it prefills, and how long it takes."""
    rng = np.random.default_rng(0)
    eng = hybrid.load(model, device="cpu", context=tokens + 256, prefix_cache_dir=directory)
    V = min(30000, eng.config.vocab_size - 1)
    history = rng.integers(10, V, tokens).tolist()
    t0 = time.perf_counter()
    answer = [s.token for s in eng.generate(history, 4, sampler=lambda lg: int(lg.argmax()))]
    first_s = time.perf_counter() - t0
    eng.close()
    turn = history + answer + rng.integers(10, V, new_tokens).tolist()
    eng = hybrid.load(model, device="cpu", context=tokens + 256, prefix_cache_dir=directory)
    t0 = time.perf_counter()
    steps = list(eng.generate(turn, 4, sampler=lambda lg: int(lg.argmax())))
    out = {"history_tokens": tokens, "first_turn_s": first_s, "after_restart_prefilled": steps[0].prefill_tokens,
           "after_restart_new_tokens": len(turn) - len(history) - len(answer) + 1,
           "after_restart_s": time.perf_counter() - t0, "disk_tokens": eng.stats()["kv"]["disk_tokens"]}
    eng.close()
    return out


def attention(model: str, contexts: list[int], steps: int) -> list[dict]:
    from hybrid.model.k2 import KVCache
    from hybrid.model.linear import absorbed_attention

    out = []
    for ctx in contexts:
        eng = hybrid.load(model, device="cpu", context=ctx + 64, decode_graphs="off")
        m, cfg = eng.model, eng.config
        H, P, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        g = torch.Generator().manual_seed(1)
        q_nope, q_pe = torch.randn(1, H, P, generator=g), torch.randn(1, H, R, generator=g)
        kinds = {"contiguous_fp32": lambda: _contiguous(KVCache(cfg, ctx + 64), cfg, ctx),
                 "paged_fp32": lambda: _paged(cfg, ctx, torch.float32, 0),
                 "paged_bf16": lambda: _paged(cfg, ctx, torch.bfloat16, 0),
                 "paged_bf16_75pct_host": lambda: _paged(cfg, ctx, torch.bfloat16, 0.75)}
        caches = {k: make() for k, make in kinds.items()}
        core = {k: [] for k in kinds}
        step = {k: [] for k in kinds}
        for s in range(steps + 1):  # the kinds interleaved, so the machine's drift falls on all alike
            for k, cache in caches.items():
                t0 = time.perf_counter()
                for i in range(cfg.num_hidden_layers):  # the attention over the cache alone, every layer
                    a = m.weights.layers[i].self_attn
                    attend = lambda ql, qp: cache.attend(i, ctx, ql, qp, cfg.softmax_scale, ctx - 1)  # noqa: B023,E731
                    absorbed_attention(q_nope, q_pe, attend, a.kv_b_heads, a.w_uk, a.w_uv)
                t1 = time.perf_counter()
                m.forward(torch.tensor([5 + s]), cache, last_only=True)  # a whole decode step
                t2 = time.perf_counter()
                cache.truncate(ctx)
                if s:
                    core[k].append(t1 - t0)
                    step[k].append(t2 - t1)
        row = {"context": ctx, "kv_bytes_per_token_bf16": ctx * (cfg.kv_lora_rank + R) * 2 * cfg.num_hidden_layers}
        for k in kinds:
            row[k] = {"attention_ms_per_token": 1e3 * statistics.median(core[k]),
                      "decode_step_ms": 1e3 * statistics.median(step[k])}
        base = row["contiguous_fp32"]["attention_ms_per_token"]
        row["attention_speed_vs_contiguous_fp32"] = {k: base / row[k]["attention_ms_per_token"] for k in kinds}
        out.append(row)
        eng.close()
    return out


def _contiguous(cache, cfg, ctx: int):
    g = torch.Generator().manual_seed(0)
    cache.kv[:, :ctx] = torch.randn(cfg.num_hidden_layers, ctx, cfg.kv_lora_rank, generator=g)
    cache.pe[:, :ctx] = torch.randn(cfg.num_hidden_layers, ctx, cfg.qk_rope_head_dim, generator=g)
    cache.length = ctx
    return cache


def _paged(cfg, ctx: int, dtype: torch.dtype, host_share: float):
    """A KV store whose live sequence holds ctx random positions, host_share of its pages in the host tier."""
    from hybrid.runtime.kv_store import KVSizes, KVStore
    from hybrid.runtime.options import PAGE_SIZE

    pages = -(-(ctx + 64) // PAGE_SIZE)
    host = int(pages * host_share)
    store = KVStore(cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, ctx + 64,
                    KVSizes(PAGE_SIZE, pages - host + (1 if host else 0), host + 1), "cpu", dtype, torch.float32)
    cache = store.cache
    cache.prepare(0, ctx + 1)
    g = torch.Generator().manual_seed(0)
    for e in cache.pages:
        page = store.pages.page(e)
        page.copy_(torch.randn(page.shape, generator=g).to(dtype))
    cache.length = ctx
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("interleave", "attention", "restart"))
    ap.add_argument("--tokens", type=int, default=16384, help="restart: the conversation's length")
    ap.add_argument("--dir", default="/tmp/kimi-hybrid-bench-prefixes", help="restart: the prefix-cache directory")
    ap.add_argument("--model", default="k2-slice")
    ap.add_argument("--convs", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=40, help="tokens each turn appends (a tool result, say)")
    ap.add_argument("--answer", type=int, default=8, help="tokens generated each turn")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    if a.what == "interleave":
        print(json.dumps(interleave(a.model, a.convs, a.turns, a.new_tokens, a.answer), indent=1))
    elif a.what == "restart":
        print(json.dumps(restart(a.model, a.tokens, a.new_tokens, a.dir), indent=1))
    else:
        print(json.dumps(attention(a.model, a.contexts, a.steps), indent=1))


if __name__ == "__main__":
    main()
