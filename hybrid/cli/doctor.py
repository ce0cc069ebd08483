"""`kimi-hybrid doctor`: what this environment offers the runtime, in one table (or --json): versions (torch,
Numba and its threading layer, Triton), CPU vector features, RAM and its read speed, CUDA GPUs, the cache
directory with its disk and read speed, and which models are present. Loads no model; the speed probes
(hybrid.runtime.probe, skipped with --no-measure) write one scratch file and delete it.
"""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from typing import Any

import click
from rich.table import Table

from hybrid.cli.common import console, err_console
from hybrid.checkpoint.paths import cache_dir
from hybrid.runtime.resolve import REAL_MODEL, find_in_hf_cache, hf_hub_cache, missing_shards
from hybrid.synth.writer import PRESETS, is_generated, preset_path

GB = 1e9
PROBE_BYTES = 256 << 20  # RAM buffer and disk scratch file: past the caches, a few seconds at most


def version_of(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def numba_threading() -> str:
    """The threading layer Numba's parallel kernels run on (known only once one has run: a small one runs here)."""
    import numba
    import numpy as np

    from kernels_cpu.membw import read_sum

    read_sum(np.ones(4096, np.uint64), 4)
    try:
        return f"{numba.threading_layer()}, {numba.get_num_threads()} threads"
    except ValueError as e:  # no parallel region ran after all
        return f"unknown ({e})"


def models_present() -> dict[str, str]:
    """Each known model -> where it is, or what is missing."""
    out = {}
    real = find_in_hf_cache(REAL_MODEL)
    if real is None:
        out[REAL_MODEL] = f"not in the Hugging Face cache ({hf_hub_cache()}); `hf download {REAL_MODEL}` fetches it"
    else:
        missing = missing_shards(real)
        out[REAL_MODEL] = f"{real}" + (f" (incomplete: {len(missing)} shard(s) missing)" if missing else "")
    for name in PRESETS:
        path = preset_path(name)
        out[name] = str(path) if is_generated(path) else "not generated yet (made on first use)"
    return out


def speeds() -> dict[str, Any]:
    """RAM and cache-disk sequential read GB/s (what decoding from RAM and from disk is bounded by)."""
    from hybrid.runtime.probe import disk_read_gbps, mem_read_gbps  # Numba: only when doctor measures

    try:
        disk: Any = disk_read_gbps(cache_dir(), PROBE_BYTES)
    except OSError as e:
        disk = f"not measured ({e.strerror or e})"
    return {"ram_read_gbps": mem_read_gbps(PROBE_BYTES), "disk_read_gbps": disk}


def environment(measure: bool = True) -> dict[str, Any]:
    """Everything doctor reports, as plain values (the speeds None unless measured)."""
    import torch

    from hybrid.runtime.hardware import detect
    from kernels_cpu import amx
    from kernels_cpu.simd import host_features

    hw = detect()
    disk = hw.disk_for(cache_dir())
    return {
        "kimi_hybrid": version_of("kimi-hybrid"), "python": platform.python_version(),
        "torch": torch.__version__, "numba": version_of("numba"), "numba_threading": numba_threading(),
        "omp_proc_bind": os.environ.get("OMP_PROC_BIND"),
        "triton": version_of("triton"), "cpu_features": host_features(), "amx": amx.available(),
        "cores": {"physical": hw.physical_cores, "logical": hw.logical_cores, "numa_nodes": hw.numa_nodes},
        "ram_gb": {"total": hw.ram_total / GB, "available": hw.ram_available / GB},
        "cuda": {"available": hw.has_cuda, "torch_cuda": torch.version.cuda,
                 "gpus": [{"name": g.name, "total_gb": g.total_bytes / GB, "free_gb": g.free_bytes / GB}
                          for g in hw.gpus]},
        "cache_dir": str(cache_dir()),
        "cache_disk": {"free_gb": disk.free_bytes / GB, "fs_type": disk.fs_type, "device": disk.device,
                       "rotational": disk.rotational},
        "models": models_present(),
        **(speeds() if measure else {"ram_read_gbps": None, "disk_read_gbps": None}),
    }


def rows(env: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's rows: what each figure means for this runtime."""
    f = env["cpu_features"]
    kernels = "AVX-512 (32 lanes)" if f["avx512f"] and f["avx512bw"] else "AVX2" if f["avx2"] and f["fma"] else \
        "none: the Numba INT4 kernels need AVX2; --backend reference (slow) runs"
    if f["avx2"] and f["fma"]:
        kernels += (", VNNI" if f["avx512vnni"] or f["avxvnni"] else "") + \
            ("; prompts on AMX tiles" if env.get("amx") else "")
    gpus = ", ".join(f"{g['name']} ({g['free_gb']:.1f} of {g['total_gb']:.1f} GB free)" for g in env["cuda"]["gpus"])
    d, ram_s, disk_s = env["cache_disk"], env["ram_read_gbps"], env["disk_read_gbps"]
    ram_speed = f", reads at {ram_s:,.1f} GB/s" if ram_s is not None else ""
    disk_speed = "" if disk_s is None else f", reads at {disk_s:,.2f} GB/s" if isinstance(disk_s, float) else \
        f", {disk_s}"
    disk = f"{d['free_gb']:,.0f} GB free" + (f", {d['fs_type']}" if d["fs_type"] else "") + \
        (f" on {d['device']}" + (" (rotational)" if d["rotational"] else "") if d["device"] else "")
    out = [("kimi-hybrid", env["kimi_hybrid"] or "(not installed as a package)"), ("python", env["python"]),
           ("torch", env["torch"]), ("numba", f"{env['numba']}; threading layer {env['numba_threading']}"
                                               + _proc_bind_warning(env.get("omp_proc_bind"))),
           ("CPU kernels", kernels),
           ("cores", f"{env['cores']['physical']} physical, {env['cores']['logical']} threads, "
                     f"{env['cores']['numa_nodes']} NUMA node(s)"),
           ("RAM", f"{env['ram_gb']['available']:,.1f} of {env['ram_gb']['total']:,.1f} GB available{ram_speed}"),
           ("CUDA", gpus or "no GPU: the GPU side runs on the CPU (--device cpu)"),
           ("Triton", env["triton"] or "not installed (the fused hot-expert kernel needs it on a GPU)"),
           ("cache", f"{env['cache_dir']} ({disk}{disk_speed})")]
    return out + [(f"model {name}", where) for name, where in env["models"].items()]


def _proc_bind_warning(value: str | None) -> str:
    """A warning where OMP_PROC_BIND pins threads: torch's OpenMP then pins the main thread to one CPU when
    torch loads, and Numba, loaded after it, counts that one CPU and runs one thread (2-core Xeon VM:
    int8w decode 13.0-13.3 tok/s against 18.0 with it unset)."""
    if value is None or value.strip().lower() in ("", "false"):
        return ""
    return f"; OMP_PROC_BIND={value} is set: torch pins this process to one CPU and Numba runs one thread (unset it)"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="Measure RAM and cache-disk read speed (a few seconds; writes a 256 MB scratch file).")
def doctor(as_json: bool, measure: bool) -> None:
    """Check the environment: versions, Numba's threading layer, AVX2/AVX-512, RAM, CUDA and Triton, the cache
    directory and the models present."""
    with err_console.status("checking the environment" + (", measuring RAM and disk read speed" if measure else "")
                            + "..."):
        env = environment(measure)
    if as_json:
        click.echo(json.dumps(env))
        return
    t = Table(title="kimi-hybrid doctor", show_header=False)
    t.add_column(no_wrap=True)
    t.add_column(overflow="fold")  # a narrow terminal wraps the values, never cuts them short
    for k, v in rows(env):
        t.add_row(k, v)
    console.print(t)
