#!/usr/bin/env python3
"""kimi-hybrid and llama.cpp side by side on the same checkpoint, CPU only, in one sitting.

    python scripts/compare_llamacpp.py --llama-bench ~/llama.cpp/build/bin/llama-bench \\
        --gguf k2-slice-q4_0-bf16.gguf [--model k2-slice] [--gpu-precision auto|int8] \\
        [--cpu-prompt-math fp32|bf16] [--threads 2] [--prompt-tokens 128] [--gen-tokens 32] \\
        [--rounds 3] [--json]

Ours first runs once untimed at the measured shapes (llama-bench warms up before each of its tests
itself). Each round then measures, one after another, the machine's RAM read bandwidth, our prompt
processing and generation (hybrid.bench.engine_bench, one run), llama.cpp's prompt processing
(`llama-bench -p P -n 0`) and its generation after a P-token context (`llama-bench -p 0 -n G -d P`,
the context ours decodes after). The order alternates between rounds so neither side always runs on a warmer or
cooler machine. It prints the medians and ours/theirs per test (a table, or one JSON object).

llama.cpp is not a dependency: point --llama-bench at a binary you built (README: "Compare with
llama.cpp"). Compare like with like: a GGUF whose non-expert weights are BF16 against our default
(bf16 weights, fp32 math), one whose non-expert weights are Q8_0 against --gpu-precision int8.
llama.cpp rounds the activations of a bf16 weight's product to bf16; --cpu-prompt-math bf16 does the
same for our prompt products (on CPUs with AVX512_BF16 or AMX).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import hybrid
from hybrid.bench.engine_bench import bench_engine
from hybrid.runtime.probe import mem_read_gbps, probe_buffer

LLAMA_TIMEOUT_S = 1800  # one llama-bench test; a bound, so a hung binary cannot hang the comparison


def llama_bench(binary: Path, gguf: Path, threads: int, prompt: int, gen: int, depth: int) -> float:
    """tokens/s of one llama-bench test (prompt processing when gen == 0, generation otherwise)."""
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
           "-d", str(depth), "-r", "1", "-o", "json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=LLAMA_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        sys.exit(f"llama-bench ran past {LLAMA_TIMEOUT_S} s: {' '.join(cmd)}")
    if out.returncode != 0:
        sys.exit(f"llama-bench failed (exit {out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    try:
        rows = json.loads(out.stdout)
    except json.JSONDecodeError:
        sys.exit(f"llama-bench printed no JSON (is {binary} llama.cpp's llama-bench?):\n{out.stdout[-2000:]}")
    if len(rows) != 1 or "avg_ts" not in rows[0]:
        sys.exit(f"llama-bench gave {len(rows)} results without 'avg_ts'; expected one test: {' '.join(cmd)}")
    return float(rows[0]["avg_ts"])


def ours(engine, prompt: int, gen: int, gbps: float, r: int) -> tuple[float, float, float]:
    """(prompt tok/s, generation tok/s, generation's share of the RAM bandwidth in %) of one run."""
    rep = bench_engine(engine, prompt, gen, 1, mem_gbps=gbps, warmup=False, seed=r)
    return rep["prefill"]["tok_s"]["median"], rep["decode"]["tok_s"]["median"], rep["decode"]["pct_of_mem_read"]


def compare(args: argparse.Namespace) -> dict:
    P, G, T = args.prompt_tokens, args.gen_tokens, args.threads
    engine = hybrid.load(args.model, device="cpu", cpu_threads=T, gpu_precision=args.gpu_precision,
                         cpu_prompt_math=args.cpu_prompt_math, context=max(4096, P + G + 16))
    with engine:
        # not measured: one run at the measured prompt length, our warm-up (llama-bench warms up before
        # each of its tests itself)
        bench_engine(engine, P, 2, 1, mem_gbps=1.0, warmup=False)
        llama_bench(args.llama_bench, args.gguf, T, 16, 0, 0)  # the same for llama.cpp: pages in its GGUF
        rows: dict[str, list[float]] = {k: [] for k in ("gbps", "pp_ours", "tg_ours", "pct_ours", "pp_llama", "tg_llama")}
        buf = probe_buffer(args.probe_mb << 20)  # one for every round: a freed one cost the next run (probe_buffer)
        for r in range(args.rounds):
            rows["gbps"].append(mem_read_gbps(buf=buf))
            steps = [("ours", lambda: ours(engine, P, G, rows["gbps"][-1], r)),
                     ("llama", lambda: (llama_bench(args.llama_bench, args.gguf, T, P, 0, 0),
                                        llama_bench(args.llama_bench, args.gguf, T, 0, G, P)))]
            for who, run in (steps if r % 2 == 0 else steps[::-1]):
                got = run()
                rows[f"pp_{who}"].append(got[0])
                rows[f"tg_{who}"].append(got[1])
                if who == "ours":
                    rows["pct_ours"].append(got[2])
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()),
                  file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"settings": {"model": str(args.model), "gguf": str(args.gguf), "threads": T, "prompt_tokens": P,
                         "gen_tokens": G, "depth": P, "rounds": args.rounds, "gpu_precision": args.gpu_precision,
                         "cpu_prompt_math": args.cpu_prompt_math},
            "mem_read_gbps": med["gbps"], "runs": rows,
            "pp": {"ours_tok_s": med["pp_ours"], "llamacpp_tok_s": med["pp_llama"], "ratio": med["pp_ours"] / med["pp_llama"]},
            "tg": {"ours_tok_s": med["tg_ours"], "llamacpp_tok_s": med["tg_llama"], "ratio": med["tg_ours"] / med["tg_llama"],
                   "ours_pct_of_mem_read": med["pct_ours"]}}


def table(res: dict) -> str:
    s = res["settings"]
    ours_opts = f"--gpu-precision {s['gpu_precision']} --cpu-prompt-math {s['cpu_prompt_math']}"
    lines = [f"{s['model']} (ours, {ours_opts}) vs {Path(s['gguf']).name} (llama.cpp), "
             f"{s['threads']} threads, median of {s['rounds']} interleaved rounds; RAM read {res['mem_read_gbps']:.1f} GB/s",
             f"{'test':<24}{'llama.cpp tok/s':>16}{'ours tok/s':>12}{'ours/theirs':>13}"]
    for key, name in (("pp", f"pp{s['prompt_tokens']}"), ("tg", f"tg{s['gen_tokens']} @ depth {s['depth']}")):
        t = res[key]
        lines.append(f"{name:<24}{t['llamacpp_tok_s']:>16.2f}{t['ours_tok_s']:>12.2f}{t['ratio']:>13.2f}")
    lines.append(f"our generation reads {res['tg']['ours_pct_of_mem_read']:.0f}% of the RAM bandwidth")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bench", type=Path, required=True, help="llama.cpp's llama-bench binary")
    ap.add_argument("--gguf", type=Path, required=True, help="the same checkpoint converted to GGUF")
    ap.add_argument("--model", default="k2-slice", help="ours: checkpoint directory or preset (default k2-slice)")
    ap.add_argument("--gpu-precision", choices=("auto", "int8"), default="auto",
                    help="ours: bf16 non-expert weights (auto) or int8 (against a Q8_0 GGUF)")
    ap.add_argument("--cpu-prompt-math", choices=("fp32", "bf16"), default="fp32",
                    help="ours: prompt products in fp32 (exact) or bf16 (llama.cpp's rounding; AVX512_BF16 or AMX)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--probe-mb", type=int, default=1024, help="buffer of the RAM bandwidth probe")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    for opt, path in (("--llama-bench", args.llama_bench), ("--gguf", args.gguf)):
        if not path.is_file():
            sys.exit(f"{opt} {path}: no such file")
    if min(args.threads, args.prompt_tokens, args.rounds) < 1 or args.gen_tokens < 2:
        sys.exit("--threads, --prompt-tokens and --rounds must be >= 1 and --gen-tokens >= 2")
    res = compare(args)
    print(json.dumps(res, indent=2) if args.json else table(res))


if __name__ == "__main__":
    main()
