"""`kimi-hybrid bench`: the model's prompt processing and generation speed as tables (or --json), and
`bench --kernels` for the CPU expert kernels alone.

Owns rendering the figures of hybrid.bench.engine_bench (schema: docs/bench_schema.md) and hybrid.bench.kernel_bench.
With no --model it runs the built-in k2-slice (BENCH_MODEL): real K2 layer shapes, generated on first use; the
one command whose default is not the real model, on purpose.
"""
from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table

from hybrid.cli.common import (MODEL_HELP, REAL_MODEL, UserError, console, engine_options, err_console, load_engine,
                               resolve_model)
from hybrid.cli.kernel_table import kernel_table
from hybrid.runtime.hardware import MAX_THREADS

SPLIT_LABELS = {"gpu_side": "GPU-side layers (attention, router, shared expert, dense, lm_head)",
                "experts_compute": "CPU experts computing (beside the GPU side; CPU-only: within the wait)",
                "experts_wait": "forward pass waiting for the CPU experts",
                "io_wait": "expert workers waiting for disk reads",
                "overhead": "Python overhead in the forward pass",
                "unaccounted": "outside the forward pass (sampling, loop)"}
# not common.DEFAULT_MODEL: a benchmark needs K2's real shapes, and the real model is not on most machines
BENCH_MODEL = "k2-slice"
MAX_PROBE_MB = 64 << 10  # 64 GiB: far past any CPU cache; more measures nothing new


@click.command()
@click.option("--model", "-m", default=BENCH_MODEL, show_default=True,
              help=f"{MODEL_HELP} The default is {BENCH_MODEL} on purpose (the one command not defaulting to the real "
                   f"model): Kimi K2's real layer shapes in 4 layers (5.1 GB, generated on first use), so the figures "
                   f"mean something on any machine; -m {REAL_MODEL} benches the real model.")
@engine_options
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Prompt length for the prompt-processing test.")
@click.option("--gen-tokens", type=click.IntRange(min=2), default=32, show_default=True,
              help="Tokens generated per run.")
@click.option("--runs", type=click.IntRange(1, 1000), default=3, show_default=True, help="Measured runs (after a warm-up).")
@click.option("--probe-mb", type=click.IntRange(1, MAX_PROBE_MB), default=1024, show_default=True,
              help="Buffer for the RAM bandwidth probe (well past the CPU caches), held from the first probe to "
                   "the last.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (schema: docs/bench_schema.md).")
@click.option("--kernels", is_flag=True, help="Benchmark the CPU expert kernels alone, on Kimi K2 shapes.")
@click.option("--small", is_flag=True, help="With --kernels: tiny shapes (a smoke run, seconds).")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), help="With --kernels: CPU threads (default: all).")
def bench(model: str, prompt_tokens: int, gen_tokens: int, runs: int, probe_mb: int, as_json: bool, kernels: bool, small: bool,
          threads: int | None, **engine_opts: Any) -> None:
    """Measure tokens/s: prompt processing and generation, where the time goes, bandwidth achieved."""
    if kernels:
        ctx = click.get_current_context()
        model_opts = [f"--{name.replace('_', '-')}" for name in ("model", "prompt_tokens", "gen_tokens", "runs",
                                                                 "probe_mb", *engine_opts)
                      if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if model_opts:
            raise UserError(f"--kernels measures the CPU expert kernels alone, on random K2-shaped experts: "
                            f"{', '.join(model_opts)} " + ("does not apply; leave it out" if len(model_opts) == 1 else
                                                           "do not apply; leave them out") +
                            ", or drop --kernels to bench the model")
        return _kernels(as_json, small, threads)
    if small or threads:
        raise UserError("--small and --threads go with --kernels; for the model use --cpu-threads")
    from hybrid.bench.engine_bench import bench_engine

    _check_probe(probe_mb)

    path = resolve_model(model)
    with err_console.status(f"loading {model}..."):
        engine = load_engine(path, **engine_opts)
    with engine, err_console.status("warming up (compiling kernels, reading weights), then measuring...") as status:
        def progress(r: int) -> None:
            if r + 1 < runs:
                status.update(f"run {r + 2}/{runs}: {prompt_tokens} prompt tokens, then {gen_tokens} generated...")

        result = bench_engine(engine, prompt_tokens, gen_tokens, runs, name=model, on_run=progress,
                              probe_bytes=probe_mb << 20, backend=engine_opts.get("backend") or "auto")
    if as_json:
        click.echo(json.dumps(result))
    else:
        render(result)


def _num(x: float | None, fmt: str = ",.1f") -> str:
    return "-" if x is None else format(x, fmt)


COMPONENT_LABELS = {"attention_projections": "attention projections (q_a, q_b, kv_a, o_proj)",
                    "attention_math": "attention math (norms, rope, latent cache, MLA)",
                    "router": "router", "shared_expert": "shared expert (and hot experts)",
                    "dense_mlp": "dense layer MLP", "head": "final norm and lm_head",
                    "experts": "routed experts (beside the GPU side; CPU-only: in the wait)",
                    "experts_wait": "waiting for the routed experts", "sampling": "sampling",
                    "dispatch_overhead": "Python and torch dispatch between the timed parts",
                    "outside_forward": "token loop outside the forward pass"}


def _render_components(comp: dict, pre: dict, mem_gbps: float) -> None:
    t = Table(title=f"by component: prefill ms per prompt token; decode per token (RAM read bandwidth {mem_gbps:.1f} "
              "GB/s in this run)", title_justify="left")
    for col in ("component", "prefill ms", "decode ms", "MB", "GB/s", "% of RAM", "in place GB/s", "% of that"):
        t.add_column(col, justify="left" if col == "component" else "right")
    for key, label in COMPONENT_LABELS.items():
        c = comp[key]
        mb = None if c["bytes_per_token"] is None else c["bytes_per_token"] / 1e6
        t.add_row(label, _num(pre[key]["ms_per_token"], ",.2f"), _num(c["ms_per_token"], ",.2f"), _num(mb, ",.1f"),
                  _num(c["gbps"], ",.1f"), _num(c["pct_of_mem_read"], ",.0f"), _num(c["in_place_gbps"], ",.1f"),
                  _num(c["pct_of_in_place"], ",.0f"))
    console.print(t)


def render(r: dict) -> None:
    m, s, pre, dec = r["model"], r["settings"], r["prefill"], r["decode"]
    console.print(f"[bold]{m['name']}[/]: {m['layers']} layers ({m['moe_layers']} MoE x {m['routed_experts']} experts, "
                  f"top-{m['experts_per_token']}); {s['backend']} backend, experts "
                  f"{s['expert_mode']}; decode graphs {s['decode_graphs']}; {r['machine']['cpu_threads']} CPU threads; "
                  f"load average {r['machine']['loadavg_1min']:.2f}", highlight=False)
    t = Table(title=f"speed over {s['runs']} runs (tokens/s)", title_justify="left")
    for col in ("test", "median", "min", "max"):
        t.add_column(col, justify="left" if col == "test" else "right")
    for label, ph in ((f"prompt processing (pp{s['prompt_tokens']})", pre), (f"generation (tg{s['gen_tokens']})", dec)):
        t.add_row(label, *(_num(ph["tok_s"][k], ",.2f") for k in ("median", "min", "max")))
    console.print(t)

    t = Table(title="where the time goes (ms per token)", title_justify="left")
    t.add_column("component")
    t.add_column("prefill", justify="right")
    t.add_column("decode", justify="right")
    for key, label in SPLIT_LABELS.items():
        t.add_row(label, *(_num(ph["split_ms_per_token"][key], ",.2f") for ph in (pre, dec)))
    console.print(t)

    _render_components(dec["components"], pre["components"], r["machine"]["mem_read_gbps"])

    t = Table(title="decode, per token per MoE layer", title_justify="left", show_header=False)
    t.add_column("figure")
    t.add_column("value", justify="right")
    per = dec["per_moe_layer_ms"]
    t.add_row("GPU-side layers", f"{per['gpu_side']:,.3f} ms")
    t.add_row("CPU experts computing", f"{per['experts_compute']:,.3f} ms")
    t.add_row("waiting for the CPU experts", f"{per['experts_wait']:,.3f} ms")
    eff = dec["overlap_efficiency"]
    t.add_row("overlap efficiency (CPU expert time not waited for)", "-" if eff is None else f"{100 * eff:.1f}%")
    console.print(t)

    if dec["cluster"] is not None:
        _render_cluster(dec["cluster"])

    t = Table(title="bandwidth (decode)", title_justify="left", show_header=False)
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("routed expert bytes per token", f"{dec['expert_bytes_per_token'] / 1e6:,.1f} MB")
    t.add_row("other weights read per token", f"{dec['weight_bytes_per_token'] / 1e6:,.1f} MB")
    t.add_row("achieved (bytes per token x tok/s)", f"{dec['achieved_gbps']:,.2f} GB/s")
    t.add_row("RAM read bandwidth, measured in this run", f"{r['machine']['mem_read_gbps']:,.1f} GB/s")
    t.add_row("share of the measured bandwidth", f"{dec['pct_of_mem_read']:.1f}%")
    if dec["pct_of_mem_read_paired"] is not None:
        t.add_row("share against the probes beside each run", f"{dec['pct_of_mem_read_paired']:.1f}%")
    if dec["pct_of_in_place"] is not None:
        t.add_row("RAM read where the model sits (a token's bytes, in place)",
                  f"{r['machine']['mem_read_gbps_in_place']:,.1f} GB/s")
        t.add_row("share of that", f"{dec['pct_of_in_place']:.1f}%")
    tm = dec["token_ms"]
    t.add_row("one token: median / mean / p90 / max",
              f"{tm['median']:,.1f} / {tm['mean']:,.1f} / {tm['p90']:,.1f} / {tm['max']:,.1f} ms")
    t.add_row("share at the median token", f"{dec['pct_of_mem_read_median_token']:.1f}%")
    st = dec["host_steal"]
    t.add_row("the VM host's steal (all CPUs; tokens hit)", "- (not reported here)" if st is None else
              f"{st['ms_per_token']:,.1f} ms a token; {st['tokens_hit']}/{st['tokens']}")
    if st is not None and st["pct_of_mem_read_without"] is not None:
        t.add_row("share over the tokens without steal", f"{st['pct_of_mem_read_without']:.1f}%")
    t.add_row("expert kernel (expert bytes / compute time)", _num(dec["expert_kernel_gbps"], ",.2f") + " GB/s")
    t.add_row("read from disk per token", f"{dec['disk_bytes_per_token'] / 1e6:,.1f} MB")
    cache = r["cache"]
    t.add_row("expert cache hit rate", "- (mmap: no cache)" if cache is None else
              f"{_num(None if cache['hit_rate'] is None else 100 * cache['hit_rate'])}% "
              f"({cache['hits']:,} hits, {cache['misses']:,} misses)")
    console.print(t)


def _render_cluster(c: dict) -> None:
    per = c["overhead_ms_per_moe_layer"]
    t = Table(title=f"decode on {c['world']} machines, per token: the head and {c['world'] - 1} node(s); per-layer "
              f"overhead {_num(per, ',.3f')} ms; the network {_num(c['network_ms_per_token'], ',.2f')} ms per token "
              f"({100 * c['network_share']:.1f}%)", title_justify="left")
    for col in ("node", "experts", "compute ms", "network ms", "wait ms", "expert MB", "disk MB"):
        t.add_column(col, justify="left" if col == "node" else "right")
    n = c["nodes"]
    for i in range(len(n["experts_per_token"])):
        t.add_row(str(i + 1), _num(n["experts_per_token"][i]), _num(n["compute_ms_per_token"][i], ",.2f"),
                  _num(n["network_ms_per_token"][i], ",.2f"), _num(n["wait_ms_per_token"][i], ",.2f"),
                  _num(n["expert_bytes_per_token"][i] / 1e6), _num(n["disk_bytes_per_token"][i] / 1e6))
    console.print(t)
    if c["lost"]:
        console.print(f"  the nodes were lost: {c['lost']}", style="yellow", highlight=False, markup=False)


def _check_probe(probe_mb: int) -> None:
    """The probe buffer must fit in the RAM free now (numpy would fail, or the OOM killer strike, later)."""
    import psutil

    free_mb = psutil.virtual_memory().available >> 20
    if probe_mb > free_mb // 2:
        raise UserError(f"--probe-mb {probe_mb} asks for a {probe_mb:,} MB buffer but only {free_mb:,} MB of RAM is "
                        f"available; use --probe-mb {min(1024, max(1, free_mb // 4))} (1024 is plenty: the CPU caches "
                        "are far smaller)")


def _kernels(as_json: bool, small: bool, threads: int | None) -> None:
    try:
        from hybrid.bench.kernel_bench import run_kernel_bench
    except ImportError as e:  # the benchmark module is its own piece of work (issue 3)
        raise UserError(f"the kernel benchmark is not available in this build ({e})") from None
    if threads is not None:
        import numba

        if threads > numba.config.NUMBA_NUM_THREADS:
            raise UserError(f"--threads {threads} is more than the {numba.config.NUMBA_NUM_THREADS} threads Numba can "
                            f"use here (NUMBA_NUM_THREADS, by default the logical cores); use --threads "
                            f"{numba.config.NUMBA_NUM_THREADS} or less")
    result = run_kernel_bench(small=small, threads=threads)
    if as_json:
        click.echo(json.dumps(result))
        return
    console.print(kernel_table(result))
