"""`kimi-hybrid node`: this machine computes a share of every MoE layer's routed experts for a head.

Owns the command's flags and its messages; the session itself is hybrid.cluster.node.run_node.
"""
from __future__ import annotations

import click

from hybrid.cli.common import GB_SIZE, REAL_MODEL, FiniteFloat, err_console, resolve_model
from hybrid.cluster.token import TOKEN_ENV, check_token
from hybrid.runtime.hardware import MAX_THREADS, detect


@click.command()
@click.option("--head", required=True, help="HOST:PORT the head listens at (its --listen).")
@click.option("--model", "-m", default=REAL_MODEL, show_default=True,
              help="This machine's copy of the head's checkpoint (directory, repo id in the local cache, or preset), "
              "or its share of it (kimi-hybrid split).")
@click.option("--token", envvar=TOKEN_ENV, help=f"The head's shared secret [env {TOKEN_ENV}].")
@click.option("--expert-mode", type=click.Choice(["auto", "mmap", "ram", "cache"]), default="auto", show_default=True,
              help="This node's experts from the page cache (mmap), its share copied into RAM at load on 2 MB pages "
              "(ram), or a RAM slot cache fed from disk; auto: mmap when its share fits the RAM budget.")
@click.option("--ram-budget", type=GB_SIZE, help="GB of RAM for this node's experts (default: 80% of RAM).")
@click.option("--cpu-threads", type=click.IntRange(1, MAX_THREADS), help="Threads for the expert kernels.")
@click.option("--backend", type=click.Choice(["auto", "numba", "reference"]), default="auto", show_default=True,
              help="Expert kernels: numba (AVX2), or the torch reference.")
@click.option("--mem-gbps", type=FiniteFloat(min=0, min_open=True, max=1e5),
              help="Read GB/s to report for placement, instead of measuring it at start (the head gives each "
              "machine a share of the experts in proportion to it).")
@click.option("--join-timeout", type=FiniteFloat(min=0, min_open=True, max=1e7), default=600.0, show_default=True,
              help="Seconds to wait for the head.")
def node(head: str, model: str, token: str | None, expert_mode: str, ram_budget: float | None,
         cpu_threads: int | None, backend: str, mem_gbps: float | None, join_timeout: float) -> None:
    """Join a head (`--nodes N --listen HOST:PORT` on chat, run, bench or serve) and compute this machine's
    share of the routed experts until the head closes the session. Trusted networks only: see README."""
    from hybrid.cluster.node import NodeOptions, run_node  # torch: only once the command runs

    if backend == "auto":
        from kernels_cpu.simd import host_has_avx2

        backend = "numba" if host_has_avx2() else "reference"
    path = resolve_model(model)
    opts = NodeOptions(head=head, token=token or "", kind=backend, expert_mode=expert_mode,
                       ram_budget=int(ram_budget * 1e9) if ram_budget else 0, cpu_threads=cpu_threads,
                       ram_bytes=detect().ram_total, join_timeout_s=join_timeout, gbps=mem_gbps or 0.0)
    check_token(opts.token)  # before any waiting
    err_console.print(f"joining the head at {head} with {path}")
    err_console.print(run_node(path, opts, on_serving=err_console.print))
