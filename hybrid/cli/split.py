"""`kimi-hybrid split`: write one expert node's share of a checkpoint as a smaller checkpoint of its own.

Owns the command's flags and its messages; the writing is hybrid.cluster.share.write_share, the choice
of experts hybrid.cluster.plan.split (the same split a head keeps for a share node, see README).
"""
from __future__ import annotations

from pathlib import Path

import click

from hybrid.cli.common import REAL_MODEL, UserError, err_console, resolve_model


def _weights(text: str | None, nodes: int) -> list[float]:
    if text is None:
        return [1.0] * nodes
    try:
        w = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--weights {text!r}: give {nodes} numbers separated by commas, e.g. 1,1,2") from None
    if len(w) != nodes or not all(0 < v < float("inf") for v in w):
        raise UserError(f"--weights {text!r}: give {nodes} positive numbers (one per machine, the head first)")
    return w


@click.command()
@click.option("--model", "-m", default=REAL_MODEL, show_default=True, help="The full checkpoint to cut the share from.")
@click.option("--nodes", type=click.IntRange(2, 64), required=True, help="Machines in the cluster, the head included.")
@click.option("--rank", type=click.IntRange(1, 63), required=True, help="Which node's share (1 .. nodes - 1; the "
              "head, rank 0, keeps the full checkpoint).")
@click.option("--weights", help="Each machine's share of the experts, the head first (e.g. 2,1,1); default: equal.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New (or empty) directory to write the share to.")
def split(model: str, nodes: int, rank: int, weights: str | None, out: Path) -> None:
    """Write node RANK's share of the routed experts (safetensors shards, their index, config.json) for
    `kimi-hybrid node --model OUT`. Non-expert tensors stay on the head, which needs the full checkpoint."""
    from hybrid.checkpoint.reader import Checkpoint  # torch: only once the command runs
    from hybrid.cluster.plan import split as split_plan
    from hybrid.cluster.share import write_share

    if rank >= nodes:
        raise UserError(f"--rank {rank}: a cluster of --nodes {nodes} has nodes 1 .. {nodes - 1}")
    path = resolve_model(model)
    ckpt = Checkpoint(path)
    try:
        cfg = ckpt.config
        holds = split_plan(cfg.moe_layers, cfg.n_routed_experts, _weights(weights, nodes)).owner == rank
        try:
            desc = write_share(ckpt, holds, out, rank, nodes)
        except FileExistsError as e:
            raise UserError(str(e)) from None
    finally:
        ckpt.close()
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    n = sum(len(v) for v in desc["experts"].values())
    err_console.print(f"wrote node {rank}'s share to {out}: {n} routed experts, {size / 1e9:,.2f} GB")
    err_console.print(f"on that machine: kimi-hybrid node --head HOST:PORT --model {out}")
