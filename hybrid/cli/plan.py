"""`kimi-hybrid plan`: the machine, what lives where (placement plan) and the decode speed to expect.

Owns rendering placement.plan() and projection.projected_decode_tps() for this machine or a
hypothetical one (--ram-gb / --gpu-gb, to plan a purchase), with bandwidths measured here unless given.
Reads only a config: planning never loads weights, and a preset is not generated to be planned.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from hybrid.cli.common import (GBPS, MACHINE_GB, FiniteFloat, UserError, console, engine_flag, err_console,
                               resolve_model)
from hybrid.checkpoint.config import ModelConfig
from hybrid.runtime.hardware import GB, MAX_THREADS, Hardware, detect
from hybrid.runtime.placement import PlanError
from hybrid.synth.writer import PRESETS, REFERENCE_DIR, preset_config

REAL_CONFIG = REFERENCE_DIR / "config.json"


def _config(model: str | None) -> tuple[ModelConfig, str, Path | None]:
    """(config, label, checkpoint dir or None) without generating or reading weights."""
    if model is None:
        return ModelConfig.from_file(REAL_CONFIG), "Kimi K2 Thinking (its config.json, shipped with kimi-hybrid)", None
    p = Path(model).expanduser()
    if p.is_file():
        return ModelConfig.from_file(p), str(p), None
    if model in PRESETS and not p.exists():
        return ModelConfig.from_dict(preset_config(model), source=f"preset {model}"), f"preset {model}", None
    d = resolve_model(model)
    return ModelConfig.from_file(d / "config.json"), model, d


def _machine(ram_gb: float | None, gpu_gb: tuple[float, ...], cores: int | None) -> tuple[Hardware, bool]:
    here = detect()
    if ram_gb is None and not gpu_gb and cores is None:
        return here, False
    return Hardware.hypothetical(ram_gb if ram_gb is not None else here.ram_total / GB, tuple(gpu_gb),
                                 cores or 16), True


@click.command()
@click.option("--model", "-m", help="Checkpoint directory, config.json, HF repo id in the local cache, or preset "
                                    "(default: the real Kimi K2 Thinking config).")
# hybrid.load's flags with the plan's defaults; any context the model allows can be planned
@engine_flag("context", type=click.IntRange(min=1), default=8192, show_default=True, help="Tokens the KV cache holds.")
@engine_flag("gpu_memory", help="GB of VRAM the plan may use (default: free VRAM minus a reserve).")
@engine_flag("ram_budget", help="GB of RAM for routed experts (default: what is left).")
@engine_flag("cpu_threads", help="Threads for the CPU experts (default: physical cores).")
@engine_flag("expert_mode", default="auto", show_default=True)
@engine_flag("gpu_precision", default="auto", show_default=True,
             help="Storage of the big GPU-side linears (on a CPU: auto is bf16 weights with fp32 math; int8 halves "
                  "them again).")
@click.option("--ram-gb", type=MACHINE_GB, help="Plan for a machine with this much RAM.")
@click.option("--gpu-gb", type=MACHINE_GB, multiple=True,
              help="Plan for a machine with a GPU of this many GB (one: kimi-hybrid runs on GPU 0).")
@engine_flag("device", default="auto", show_default=True,
             help="Where the GPU side runs (auto: CUDA when there is a GPU).")
@click.option("--cores", type=click.IntRange(1, MAX_THREADS), help="Physical cores of the hypothetical machine [default: 16].")
@click.option("--mem-gbps", type=GBPS, help="RAM read GB/s (default: measured here).")
@click.option("--disk-gbps", type=GBPS,
              help="Disk read GB/s for expert cache misses (default: measured here when needed).")
@click.option("--gpu-gbps", type=GBPS,
              help="GPU memory GB/s (default: measured on a real GPU; not counted for a hypothetical one).")
@click.option("--hit-rate", type=FiniteFloat(0, 1), help="Expert cache hit rate (default: the cache's share).")
@click.option("--nodes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Project N alike machines as one (each MoE layer's experts split across them; see README).")
@click.option("--net-gbps", type=GBPS, default=1.25, show_default=True, help="With --nodes: the head's link, GB/s.")
@click.option("--net-latency-us", type=FiniteFloat(min=0, max=1e6), default=50.0, show_default=True,
              help="With --nodes: one request-reply round trip between head and node, microseconds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan(model: str | None, context: int, gpu_memory: float | None, ram_budget: float | None,
         cpu_threads: int | None, expert_mode: str, gpu_precision: str, ram_gb: float | None, gpu_gb: tuple[float, ...],
         device: str, cores: int | None, mem_gbps: float | None, disk_gbps: float | None, gpu_gbps: float | None,
         hit_rate: float | None, nodes: int, net_gbps: float, net_latency_us: float, as_json: bool) -> None:
    """Where each part of the model goes on this (or a hypothetical) machine, and the decode speed to expect."""
    from hybrid.runtime.placement import plan as make_plan
    from hybrid.runtime.projection import projected_decode_tps
    from hybrid.runtime.probe import disk_read_gbps, gpu_read_gbps, mem_read_gbps

    if len(gpu_gb) > 1:
        raise UserError(f"--gpu-gb given {len(gpu_gb)} times: kimi-hybrid runs the GPU side on one GPU (GPU 0); "
                        "pass one --gpu-gb")
    cfg, label, ckpt_dir = _config(model)
    hw, hypothetical = _machine(ram_gb, gpu_gb, cores)
    measured: dict[str, Any] = {}
    if mem_gbps is None:
        with err_console.status("measuring RAM read bandwidth..."):
            mem_gbps = measured["mem_read_gbps"] = mem_read_gbps(threads=cpu_threads)
    machine = {"hypothetical": hypothetical, "summary": hw.describe(), "mem_read_gbps": mem_gbps,
               "disk_read_gbps": disk_gbps, "gpu_read_gbps": gpu_gbps, "measured_here": sorted(measured)}
    if not as_json:
        _render_machine(hw, hypothetical, machine)
    try:
        p = make_plan(cfg, hw, gpu_memory=gpu_memory, ram_budget=ram_budget, context=context, cpu_threads=cpu_threads,
                      gpu_precision=gpu_precision, expert_mode=expert_mode, checkpoint_dir=ckpt_dir, device=device)
    except PlanError as e:
        hint = "" if hypothetical else "; to plan a machine to buy, pass --ram-gb and --gpu-gb"
        raise UserError(f"the plan does not fit: {e}{hint}") from None
    misses = p.expert_mode == "cache" and (hit_rate if hit_rate is not None else 0.0) < 1
    if misses and disk_gbps is None:
        where = ckpt_dir or Path.home()
        with err_console.status(f"measuring disk read speed in {where}..."):
            disk_gbps = machine["disk_read_gbps"] = disk_read_gbps(where)
        machine["measured_here"].append("disk_read_gbps")
    if p.device == "cuda" and gpu_gbps is None and not hypothetical:
        with err_console.status("measuring GPU memory bandwidth..."):
            gpu_gbps = machine["gpu_read_gbps"] = gpu_read_gbps(p.gpu_index or 0)
        machine["measured_here"].append("gpu_read_gbps")
    if p.device == "cpu" and gpu_gbps is not None:
        err_console.print("note: --gpu-gbps ignored: this plan runs the GPU side on the CPU (its weights are read "
                          "from RAM, at --mem-gbps)", style="yellow", highlight=False)
    proj = projected_decode_tps(p, cfg, mem_gbps, disk_gbps=disk_gbps, hit_rate=hit_rate, gpu_gbps=gpu_gbps)
    cluster = _cluster(p, cfg, proj, nodes, mem_gbps, disk_gbps, net_gbps, net_latency_us) if nodes > 1 else None
    if as_json:
        rows = [{"what": w, "where": where, "precision": prec, "gb": gb} for w, where, prec, gb in p.rows()]
        click.echo(json.dumps({"model": label, "machine": machine, "plan": {"summary": p.summary(), "rows": rows,
                                "device": p.device, "expert_mode": p.expert_mode, "context": p.context},
                               "projection": proj, "cluster": cluster}))
        return
    _render_plan(label, p)
    _render_projection(proj, hypothetical, machine)
    if cluster is not None:
        console.print(f"[bold]{nodes} machines like this one as one[/] (kimi-hybrid node; README: Several machines "
                      f"as one): [bold]{cluster['tok_s']:,.2f} tok/s[/]", highlight=False)
        for line in cluster["explain"]:
            console.print(f"  {line}", highlight=False, markup=False)


def _cluster(p, cfg: ModelConfig, proj: dict, nodes: int, mem_gbps: float, disk_gbps: float | None,
             net_gbps: float, net_latency_us: float) -> dict:
    """The projection for `nodes` machines alike to the planned one (hybrid.cluster.projection)."""
    from hybrid.cluster.projection import project_cluster

    # the head's own side per token: on the GPU at its bandwidth, or on a CPU-only head from its RAM
    side_s = proj["gpu_side_bytes"] / (mem_gbps * GB) if p.device == "cpu" else proj["gpu_s"] or 0.0
    try:
        return project_cluster(nodes, p.n_moe_layers, p.experts_per_layer, p.experts_per_token, cfg.hidden_size,
                               p.expert_bytes, None if p.expert_mode == "mmap" else p.cache_slots, mem_gbps,
                               disk_gbps, side_s, net_gbps, net_latency_us)
    except ValueError as e:
        raise UserError(f"--nodes {nodes}: {e} (--disk-gbps)") from None


def _render_machine(hw: Hardware, hypothetical: bool, m: dict) -> None:
    t = Table(title="hypothetical machine" if hypothetical else "this machine", title_justify="left", show_header=False)
    t.add_column("")
    t.add_column("")
    t.add_row("RAM", f"{hw.ram_available / GB:,.1f} GB available of {hw.ram_total / GB:,.1f} GB")
    t.add_row("CPU", f"{hw.physical_cores} cores, {hw.logical_cores} threads, {hw.numa_nodes} NUMA node(s); "
                     f"{' '.join(sorted(hw.cpu_flags)) or 'no notable flags'}")
    t.add_row("GPUs", ", ".join(f"{g.name}: {g.free_bytes / GB:,.1f} GB free of {g.total_bytes / GB:,.1f}"
                                for g in hw.gpus) or "none (the GPU side runs on the CPU, in fp32 math)")
    how = ("given" if "mem_read_gbps" not in m["measured_here"] else
           "measured on THIS machine" if hypothetical else "measured")
    t.add_row("RAM read", f"{m['mem_read_gbps']:,.1f} GB/s ({how})")
    console.print(t)


def _render_plan(label: str, p) -> None:
    t = Table(title=f"placement plan: {label}", title_justify="left")
    for col, just in (("what", "left"), ("where", "left"), ("precision", "left"), ("GB", "right")):
        t.add_column(col, justify=just)
    for what, where, prec, gb in p.rows():
        t.add_row(what, where, prec, f"{gb:,.2f}")
    if p.device == "cuda":
        t.add_row("[bold]on the GPU[/]", "gpu", "", f"[bold]{p.gpu_bytes / GB:,.2f}[/] of {p.gpu_budget / GB:,.2f}")
    t.add_row("[bold]in RAM[/]", "ram", "", f"[bold]{p.ram_bytes / GB:,.2f}[/] of {p.ram_available / GB:,.2f}")
    console.print(t)
    console.print(p.summary(), style="dim", highlight=False)


def _render_projection(proj: dict, hypothetical: bool, m: dict) -> None:
    t = Table(title="projected decode speed (batch 1)", title_justify="left",
              show_header=False)
    t.add_column("")
    t.add_column("", justify="right")
    t.add_row("routed expert bytes per token", f"{proj['routed_bytes_per_token'] / GB:,.2f} GB")
    t.add_row("  read by the CPU from RAM", f"{proj['cpu_expert_bytes'] / GB:,.2f} GB")
    t.add_row("  read from disk (cache misses)", f"{proj['disk_bytes'] / GB:,.2f} GB")
    t.add_row("GPU-side weights + KV cache per token", f"{proj['gpu_side_bytes'] / GB:,.2f} GB")
    for stage in ("ram", "disk", "gpu"):
        v = proj[f"{stage}_s"]
        t.add_row(f"time per token: {stage}", "not counted" if v is None else f"{1e3 * v:,.1f} ms")
    t.add_row("[bold]decode, stages overlapped[/]",
              "not counted" if proj["tok_s"] is None else f"[bold]{proj['tok_s']:,.2f} tok/s[/]")
    t.add_row("decode, stages one after another",
              "not counted" if proj["tok_s_serial"] is None else f"{proj['tok_s_serial']:,.2f} tok/s")
    t.add_row("bottleneck", proj["bottleneck"])
    console.print(t)
    for line in proj["explain"]:
        console.print(f"  {line}", highlight=False, markup=False)
    if hypothetical and m["measured_here"]:
        console.print(f"  note: {', '.join(m['measured_here'])} measured on THIS machine; pass --mem-gbps / "
                      "--disk-gbps / --gpu-gbps for the machine you are planning", style="yellow", highlight=False)
