"""`kimi-hybrid plan`: the machine, what lives where (placement plan) and the decode speed to expect.

Owns rendering placement.plan() and projection.projected_decode_tps() for this machine or a
hypothetical one (--ram-gb / --gpu-gb, to plan a purchase), then what would help (projection.what_would_help,
--nodes through hybrid.cluster.projection). Bandwidths: given, else measured here, else (a hypothetical
machine: never this box's) typical for the hardware described (hardware.RAM_TYPES / DISK_TYPES); each
figure says which. Reads only a config: planning never loads weights, and a preset is not generated.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from hybrid.cli.common import (GBPS, MACHINE_GB, FiniteFloat, UserError, console, engine_flag, err_console,
                               resolve_model)
from hybrid.checkpoint.config import ModelConfig
from hybrid.runtime.hardware import (DESKTOP_MAX_RAM_GB, DISK_TYPES, GB, MAX_THREADS, RAM_TYPES, Hardware, detect, typical_channels,
                                     typical_mem_gbps)
from hybrid.runtime.context import DEFAULT_HELP as CONTEXT_HELP
from hybrid.runtime.placement import PlanError
from hybrid.runtime.projection import gbps
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
@engine_flag("context", type=click.IntRange(min=1),
             help=f"Tokens the KV cache holds, as run, chat and bench load it. [default: {CONTEXT_HELP}]")
@engine_flag("gpu_memory", help="GB of VRAM the plan may use (default: free VRAM minus a reserve).")
@engine_flag("ram_budget", help="GB of RAM for routed experts (default: what is left).")
@engine_flag("cpu_threads", help="Threads for the CPU experts (default: physical cores).")
@engine_flag("expert_mode", default="auto", show_default=True)
@engine_flag("gpu_precision", default="auto", show_default=True,
             help="Storage of the big GPU-side linears (on a CPU: auto is bf16 weights with fp32 math; int8 halves "
                  "them again).")
@click.option("--ram-gb", type=MACHINE_GB, help="Plan for a machine with this much RAM.")
@click.option("--gpu-gb", type=MACHINE_GB, multiple=True,
              help="Plan for a machine with a GPU of this many GB; repeat for more GPUs (kimi-hybrid runs on the "
                   "first; the plan says what the others would add).")
@engine_flag("device", default="auto", show_default=True,
             help="Where the GPU side runs (auto: CUDA when there is a GPU).")
@click.option("--cores", type=click.IntRange(1, MAX_THREADS), help="Physical cores of the hypothetical machine [default: 16].")
@click.option("--mem-gbps", type=GBPS, help="RAM read GB/s (default: measured here; for a hypothetical machine, "
                                            "typical for --ram-type and --ram-channels).")
@click.option("--ram-type", type=click.Choice(list(RAM_TYPES)),
              help="Typical RAM read speed for this DDR type [default: ddr5-4800 for a hypothetical machine].")
@click.option("--ram-channels", type=click.IntRange(1, 24),
              help=f"Memory channels, for the typical RAM speed [default: 2 up to {DESKTOP_MAX_RAM_GB} GB "
                   "of RAM (a desktop), else 8 (a workstation)].")
@click.option("--disk-gbps", type=GBPS,
              help="Disk read GB/s for expert cache misses (default: measured here when needed; for a hypothetical "
                   "machine, typical for --disk-type).")
@click.option("--disk-type", type=click.Choice(list(DISK_TYPES)),
              help="Typical disk read speed for this kind of disk [default: nvme-gen4 for a hypothetical machine].")
@click.option("--gpu-gbps", type=GBPS,
              help="GPU memory GB/s (default: measured on a real GPU; not counted for a hypothetical one).")
@click.option("--hit-rate", type=FiniteFloat(0, 1), help="Expert cache hit rate (default: the cache's share).")
@click.option("--nodes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Project N alike machines as one (each MoE layer's experts split across them; see README).")
@click.option("--net-gbps", type=GBPS, default=1.25, show_default=True, help="With --nodes: the head's link, GB/s.")
@click.option("--net-latency-us", type=FiniteFloat(min=0, max=1e6), default=50.0, show_default=True,
              help="With --nodes: one request-reply round trip between head and node, microseconds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan(model: str | None, context: int | None, gpu_memory: float | None, ram_budget: float | None,
         cpu_threads: int | None, expert_mode: str, gpu_precision: str, ram_gb: float | None, gpu_gb: tuple[float, ...],
         device: str, cores: int | None, mem_gbps: float | None, ram_type: str | None, ram_channels: int | None,
         disk_gbps: float | None, disk_type: str | None, gpu_gbps: float | None, hit_rate: float | None, nodes: int,
         net_gbps: float, net_latency_us: float, as_json: bool) -> None:
    """Where each part of the model goes on this (or a hypothetical) machine, the decode speed to expect, and
    what would make it faster."""
    from hybrid.runtime.placement import plan as make_plan
    from hybrid.runtime.projection import int8_note, other_gpus_help, projected_decode_tps, what_would_help

    cfg, label, ckpt_dir = _config(model)
    hw, hypothetical = _machine(ram_gb, gpu_gb, cores)
    bw = _Bandwidths(hypothetical, cpu_threads)
    bw.mem(mem_gbps, ram_type, ram_channels, hw.ram_total / GB)
    if not as_json:
        _render_machine(hw, hypothetical, bw, ram_gb is None)
    plan_kw = dict(gpu_memory=gpu_memory, ram_budget=ram_budget, context=context, cpu_threads=cpu_threads,
                   gpu_precision=gpu_precision, expert_mode=expert_mode, checkpoint_dir=ckpt_dir, device=device)
    try:
        p = make_plan(cfg, hw, **plan_kw)
    except PlanError as e:
        hint = "" if hypothetical else "; to plan a machine to buy, pass --ram-gb and --gpu-gb"
        raise UserError(f"the plan does not fit: {e}{hint}") from None
    plan_kw["context"] = p.context  # what would help is weighed at the same context
    if p.expert_mode == "cache" and (hit_rate if hit_rate is not None else 0.0) < 1:
        bw.disk(disk_gbps, disk_type, ckpt_dir or Path.home())
    if p.device == "cuda":
        bw.gpu(gpu_gbps, p.gpu_index or 0)
    elif gpu_gbps is not None:
        err_console.print("note: --gpu-gbps ignored: this plan runs attention, router and shared experts on the CPU (read "
                          "from RAM, at --mem-gbps)", style="yellow", highlight=False)
    figures = dict(disk_gbps=bw.figure["disk"], gpu_gbps=bw.figure["gpu"], hit_rate=hit_rate)
    proj = projected_decode_tps(p, cfg, bw.figure["mem"], **figures)
    cluster = _cluster(p, cfg, proj, nodes, bw.figure["mem"], bw.figure["disk"], net_gbps, net_latency_us) \
        if nodes > 1 else None
    helps = what_would_help(cfg, hw, plan_kw, p, proj, bw.figure["mem"], **figures) + \
        other_gpus_help(cfg, hw, p, bw.figure["mem"], **figures)
    if nodes == 1:
        helps += _more_nodes(p, cfg, proj, bw.figure, net_gbps, net_latency_us)
    now = proj["tok_s"]  # only what helps (by 1% or more); what an idle GPU adds is always said
    helps = [h for h in helps if h["kind"] == "gpu" or h["tok_s"] is not None and (now is None or h["tok_s"] > 1.01 * now)]
    note = int8_note(cfg, p, gpu_precision)
    if as_json:
        rows = [{"what": w, "where": where, "precision": prec, "gb": gb} for w, where, prec, gb in p.rows()]
        click.echo(json.dumps({"model": label, "machine": bw.json(hw), "plan": {
            "summary": p.summary(), "rows": rows, "device": p.device, "expert_mode": p.expert_mode,
            "context": p.context, "context_why": p.context_why, "gpu_precision": p.gpu_precision, "int8_note": note}, "projection": proj,
            "cluster": cluster, "what_would_help": helps}))
        return
    _render_plan(label, p, note)
    _render_projection(proj, p.device, bw)
    if cluster is not None:
        console.print(f"[bold]{nodes} machines like this one as one[/] (kimi-hybrid node; README: Several machines "
                      f"as one): [bold]{cluster['tok_s']:,.2f} tok/s[/]", highlight=False)
        for line in cluster["explain"]:
            console.print(f"  {line}", highlight=False, markup=False)
    _render_help(helps, proj, nodes)


class _Bandwidths:
    """Each bandwidth the projection uses and where it came from: 'given', 'measured here', 'typical: ...'
    or 'unknown'. A hypothetical machine is never measured: its figures are given or typical."""

    def __init__(self, hypothetical: bool, cpu_threads: int | None):
        self.hypothetical, self.threads = hypothetical, cpu_threads
        self.figure: dict[str, float | None] = {"mem": None, "disk": None, "gpu": None}
        self.source: dict[str, str] = {}

    def mem(self, given: float | None, ram_type: str | None, channels: int | None, ram_gb: float) -> None:
        from hybrid.runtime.probe import mem_read_gbps
        if given is not None:
            self.figure["mem"], self.source["mem"] = given, "given"
        elif self.hypothetical or ram_type or channels:
            ram_type, channels = ram_type or "ddr5-4800", channels or typical_channels(ram_gb)
            self.figure["mem"] = typical_mem_gbps(channels, ram_type)
            self.source["mem"] = f"typical: {channels}-channel {ram_type.upper()}"
        else:
            with err_console.status("measuring RAM read bandwidth..."):
                self.figure["mem"], self.source["mem"] = mem_read_gbps(threads=self.threads), "measured here"

    def disk(self, given: float | None, disk_type: str | None, where: Path) -> None:
        from hybrid.runtime.probe import disk_read_gbps
        if given is not None:
            self.figure["disk"], self.source["disk"] = given, "given"
        elif self.hypothetical or disk_type:
            disk_type = disk_type or "nvme-gen4"
            self.figure["disk"] = DISK_TYPES[disk_type]
            self.source["disk"] = f"typical: {disk_type}"
        else:
            with err_console.status(f"measuring disk read speed in {where}..."):
                self.figure["disk"], self.source["disk"] = disk_read_gbps(where), "measured here"

    def gpu(self, given: float | None, index: int) -> None:
        from hybrid.runtime.probe import gpu_read_gbps
        if given is not None:
            self.figure["gpu"], self.source["gpu"] = given, "given"
        elif self.hypothetical:
            self.source["gpu"] = "unknown: not counted; --gpu-gbps"
        else:
            with err_console.status("measuring GPU memory bandwidth..."):
                self.figure["gpu"], self.source["gpu"] = gpu_read_gbps(index), "measured here"

    def json(self, hw: Hardware) -> dict:
        return {"hypothetical": self.hypothetical, "summary": hw.describe(), "mem_read_gbps": self.figure["mem"],
                "disk_read_gbps": self.figure["disk"], "gpu_read_gbps": self.figure["gpu"],
                "measured_here": sorted(f"{k}_read_gbps" for k, v in self.source.items() if v == "measured here"),
                "sources": {f"{k}_read_gbps": v for k, v in self.source.items()}}

    def line(self, key: str) -> str | None:
        if key not in self.source:
            return None
        v = self.figure[key]
        return ("" if v is None else f"{gbps(v)} GB/s ") + f"({self.source[key]})"


def _cluster(p, cfg: ModelConfig, proj: dict, nodes: int, mem_gbps: float, disk_gbps: float | None,
             net_gbps: float, net_latency_us: float) -> dict:
    """The projection for `nodes` machines alike to the planned one (hybrid.cluster.projection)."""
    from hybrid.cluster.projection import project_cluster

    # the head's own side per token: on the GPU at its bandwidth, or on a CPU-only head from its RAM
    side_s = proj["gpu_side_bytes"] / (mem_gbps * GB) if p.device == "cpu" else proj["gpu_s"] or 0.0
    try:
        return project_cluster(nodes, p.n_moe_layers, p.experts_per_layer, p.experts_per_token, cfg.hidden_size,
                               p.expert_bytes, None if p.expert_mode != "cache" else p.cache_slots, mem_gbps,
                               disk_gbps, side_s, net_gbps, net_latency_us)
    except ValueError as e:
        raise UserError(f"--nodes {nodes}: {e} (--disk-gbps)") from None


def _more_nodes(p, cfg: ModelConfig, proj: dict, figure: dict, net_gbps: float, net_latency_us: float) -> list[dict]:
    """What a second machine like this one would give (kimi-hybrid node), at the default network figures."""
    try:
        c = _cluster(p, cfg, proj, 2, figure["mem"], figure["disk"], net_gbps, net_latency_us)
    except UserError:
        return []
    return [dict(kind="nodes", nodes=2, tok_s=c["tok_s"], text=(
        f"a second machine like this one (--nodes 2, kimi-hybrid node; {gbps(net_gbps)} GB/s link, "
        f"{net_latency_us:g} us round trip): ~{c['tok_s']:,.2f} tok/s"))]


def _render_machine(hw: Hardware, hypothetical: bool, bw: _Bandwidths, ram_here: bool) -> None:
    t = Table(title="hypothetical machine" if hypothetical else "this machine", title_justify="left", show_header=False)
    t.add_column("")
    t.add_column("")
    here = " (this machine's size; --ram-gb to set)" if hypothetical and ram_here else ""
    t.add_row("RAM", f"{hw.ram_available / GB:,.1f} GB available of {hw.ram_total / GB:,.1f} GB{here}")
    t.add_row("CPU", f"{hw.physical_cores} cores, {hw.logical_cores} threads, {hw.numa_nodes} NUMA node(s); "
                     f"{' '.join(sorted(hw.cpu_flags)) or 'no notable flags'}")
    t.add_row("GPUs", ", ".join(f"{g.name}: {g.free_bytes / GB:,.1f} GB free of {g.total_bytes / GB:,.1f}"
                                for g in hw.gpus) or "none (attention, router and shared experts run on the CPU, in fp32 math)")
    t.add_row("RAM read", bw.line("mem"))
    console.print(t)


def _render_plan(label: str, p, note: str | None) -> None:
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
    console.print(p.context_why, highlight=False)
    if note:
        console.print(f"note: {note}", style="yellow", highlight=False)


def _render_projection(proj: dict, device: str, bw: _Bandwidths) -> None:
    t = Table(title="projected decode speed (batch 1)", title_justify="left", show_header=False)
    t.add_column("")
    t.add_column("", justify="right")
    t.add_row("routed expert bytes per token", f"{proj['routed_bytes_per_token'] / GB:,.2f} GB")
    t.add_row("  read by the CPU from RAM", f"{proj['cpu_expert_bytes'] / GB:,.2f} GB")
    t.add_row("  read from disk (cache misses)", f"{proj['disk_bytes'] / GB:,.2f} GB")
    t.add_row("GPU-side weights + KV cache per token" if device == "cuda" else
              "other weights + KV cache per token (from RAM)", f"{proj['gpu_side_bytes'] / GB:,.2f} GB")
    for stage, what in (("mem", "RAM read"), ("disk", "disk read"), ("gpu", "GPU memory")):
        if bw.line(stage):
            t.add_row(what, bw.line(stage))
    for stage in ("ram", "disk", "gpu") if device == "cuda" else ("ram", "disk"):
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
    if any(v.startswith(("typical", "unknown")) for v in bw.source.values()):
        console.print("  typical figures are for the hardware described (README: Plan); for the machine you mean pass "
                      "--mem-gbps or --ram-type / --ram-channels, --disk-gbps or --disk-type, --gpu-gbps (an RTX "
                      "4090: ~1,000)", style="yellow", highlight=False)


def _render_help(helps: list[dict], proj: dict, nodes: int) -> None:
    now = "not counted" if proj["tok_s"] is None else f"{proj['tok_s']:,.2f} tok/s"
    one = "one machine: " if nodes > 1 else ""
    console.print(f"[bold]what would help[/] ({one}now {now}, bottleneck {proj['bottleneck']}; each change alone):",
                  highlight=False)
    for h in helps:
        console.print(f"  - {h['text']}", highlight=False, markup=False)
    if not helps:
        console.print("  nothing this plan can project", highlight=False)
