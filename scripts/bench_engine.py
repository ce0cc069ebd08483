#!/usr/bin/env python3
"""Engine figures for the scheduler and the expert cache on a checkpoint (default: k2-slice); prints JSON.

    python scripts/bench_engine.py [--model k2-slice] [--tokens 16] [--cache-fraction 0.5]

Measures, in one run: the disk's sequential read speed (hybrid.runtime.probe.file_read_gbps over the
largest shard, evicted from the page cache first), decode in mmap mode (MoE block time against the kernel's own time), and
decode in cache mode with the given share of the experts in RAM after evicting the shards from the
page cache (hit rate, IO GB/s, overlap efficiency), and whether both modes give the same tokens.
"""
import argparse
import json
import os
import time

import hybrid
from hybrid.runtime.probe import file_read_gbps
from hybrid.runtime.resolve import resolve_model
from hybrid.synth.writer import preset_makers


def drop_page_cache(path) -> None:
    for f in sorted(path.glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def decode(engine, prompt, n):
    list(engine.generate(prompt, 1, temperature=0))  # prefill and warm-up (numba compile, first reads)
    engine.reset_stats()
    t0 = time.perf_counter()
    toks = [s.token for s in engine.generate(prompt + [7], n, temperature=0)]
    wall = time.perf_counter() - t0
    st = engine.stats()
    t = engine.model.times
    # the MoE block as the token sees it: routing, hand-off, shared expert (overlapping the kernel), wait
    moe_block = t.router + t.submit + t.shared + t.experts_wait
    return toks, wall, st, moe_block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="k2-slice")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--cache-fraction", type=float, default=0.5)
    ap.add_argument("--prefetch-width", type=int, default=None, help="candidates per token (default: the engine's)")
    ap.add_argument("--no-prefetch", action="store_true")
    args = ap.parse_args()
    path = resolve_model(args.model, preset_makers())
    prompt = list(range(10, 30))
    shard = max(path.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    out = {"model": str(path), "disk_read_gbps": file_read_gbps(shard, nbytes=1 << 30, chunk=16 << 20)}

    # hot_experts=0: on a GPU with room for them all, the plan would take every expert off the CPU
    e = hybrid.load(path, backend="numba", expert_mode="mmap", hot_experts=0)
    list(e.generate(prompt, 2, temperature=0))  # page the experts in
    toks_mmap, wall_mmap, st, block = decode(e, prompt, args.tokens)
    n = st["tokens"]["decode"] + 1
    out["mmap"] = {
        "decode_tok_s": n / wall_mmap, "kernel_ms_per_token": 1e3 * st["experts_compute_s"] / n,
        "moe_block_ms_per_token": 1e3 * block / n, "moe_block_over_kernel": block / st["experts_compute_s"],
        "shared_ms_per_token": 1e3 * st["shared_s"] / n, "attention_ms_per_token": 1e3 * st["attention_s"] / n,
        "overhead_ms_per_token": 1e3 * st["overhead_s"] / n,
        "kernel_gbps": st["expert_bytes"] / st["experts_compute_s"] / 1e9,
    }
    e.close()

    cfg = e.config
    slots = max(1, round(args.cache_fraction * cfg.n_routed_experts * len(cfg.moe_layers)))
    e = hybrid.load(path, backend="numba", cache_slots=slots, prefetch=False if args.no_prefetch else "auto",
                    prefetch_width=args.prefetch_width, hot_experts=0)
    drop_page_cache(path)
    toks_cache, wall, st, _ = decode(e, prompt, args.tokens)
    c = st["cache"]
    # overlap efficiency = (t_io + t_compute - t_total) / min(t_io, t_compute): t_compute is the same
    # decode with nothing to read (mmap, page cache warm), t_io the readers' busy time per IO thread
    t_io, t_comp = st["io_s"] / e.model.experts.cache.io_threads, wall_mmap
    out["cache"] = {
        "slots": slots, "fraction_of_experts": args.cache_fraction, "decode_tok_s": n / wall,
        "prefetch": "off" if args.no_prefetch else "auto", "prefetch_width": args.prefetch_width,
        "hit_rate": c["hit_rate"], "prefetched": c["prefetched"], "prefetch_used": c["prefetch_used"],
        "bytes_read": st["bytes_read"], "io_gbps": st["bytes_read"] / st["io_s"] * 2 / 1e9 if st["io_s"] else None,
        "prefetch_accuracy": c["prefetch_used"] / c["prefetched"] if c["prefetched"] else None,
        "t_io_s": t_io, "t_compute_s": t_comp, "t_total_s": wall, "io_wait_s": st["io_wait_s"],
        "overlap_efficiency": (t_io + t_comp - wall) / min(t_io, t_comp) if min(t_io, t_comp) > 0 else None,
        # the same question asked within this run: the share of IO time the kernels did not wait for
        "io_hidden_fraction": 1 - st["io_wait_s"] / t_io if t_io else None,
        "same_tokens_as_mmap": toks_cache == toks_mmap,
    }
    e.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
