"""The time and bytes account of a token, by component, for `kimi-hybrid bench` (decode and prefill).

Owns the split of the GPU side's weights into the components the forward pass times (Model.times)
and the figures per component: ms per token, bytes per token, GB/s and its share of the measured RAM
bandwidth. Reads the engine's weights and stats; measures nothing itself.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from hybrid.runtime.probe import GB

if TYPE_CHECKING:
    import torch

    from hybrid.runtime.engine import Engine

PROJECTIONS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj")
# component -> (the seconds in Engine.stats() it is timed by, whether it reads weights); in bench order
COMPONENTS = {
    "attention_projections": ("attention_proj_s", True),
    "attention_math": (None, True),  # attention_s less its projections: norms, rope, cache, MLA
    "router": ("router_s", True),
    "shared_expert": ("shared_s", True),
    "dense_mlp": ("dense_s", True),
    "head": ("lm_head_s", True),
    "experts": ("experts_compute_s", True),  # beside the GPU side; with the GPU side on the CPU, within experts_wait
    "experts_wait": ("experts_wait_s", False),
    "sampling": ("sampling_s", False),
    "dispatch_overhead": ("overhead_s", False),  # the forward's time outside every timed part
    "outside_forward": (None, False),  # the token loop and Python between forward passes
}


def component_of(name: str) -> str | None:
    """The account's component of a GPU-side weight name (None: the embedding, read one row a token)."""
    if name.startswith("model.embed_tokens."):
        return None
    if name.startswith("lm_head.") or name == "model.norm.weight":
        return "head"
    if ".self_attn." in name:
        return "attention_projections" if name.split(".")[-2] in PROJECTIONS else "attention_math"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp.shared_experts." in name:
        return "shared_expert"
    if ".mlp." in name:
        return "dense_mlp"
    return "attention_math"  # input and post-attention norms


def held_weights(engine: Engine) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(name, component, tensor) of each GPU-side tensor a decoded token reads as the engine holds it (an
    int8 weight's codes and scales apart; the embedding, read one row a token, left out)."""
    for name, w in engine.model.w.items():
        what = component_of(name)
        if what is not None:
            for t in (w if isinstance(w, tuple) else (w,)):
                yield name, what, t


def weight_bytes(engine: Engine) -> dict[str, int]:
    """Bytes of GPU-side weights each component reads per decoded token, as the engine holds them."""
    out = {k: 0 for k, (_, reads) in COMPONENTS.items() if reads and k != "experts"}  # experts: not GPU-side
    for _, what, t in held_weights(engine):
        out[what] += t.nbytes
    return out


def cache_bytes(engine: Engine, positions: float) -> float:
    """Latent cache bytes one decoded token reads at `positions` cached positions (each layer once)."""
    cfg = engine.config
    row = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * engine.model.dtype.itemsize
    return positions * row * cfg.num_hidden_layers


def account(engine: Engine, sums: dict[str, float], tokens: int, passes: int, wall_s: float, mean_positions: float,
            mem_gbps: float) -> dict[str, dict[str, Any]]:
    """component -> ms_per_token, bytes_per_token (None: reads no weights), gbps and pct_of_mem_read.

    sums: Engine.stats() seconds and expert_bytes summed over `tokens` tokens taking `wall_s` in
    `passes` forward passes (decode: one a token; prefill: one a prompt chunk), each reading every
    GPU-side weight once and the latent cache at `mean_positions` positions, on average."""
    seconds = {k: sums[src] for k, (src, _) in COMPONENTS.items() if src}
    seconds["attention_math"] = max(0.0, sums["attention_s"] - sums["attention_proj_s"])
    seconds["outside_forward"] = max(0.0, wall_s - sums["forward_s"] - sums["sampling_s"])
    per_pass = {k: v * passes / tokens for k, v in weight_bytes(engine).items()}
    nbytes: dict[str, float] = {**per_pass, "experts": sums["expert_bytes"] / tokens}
    nbytes["attention_math"] += cache_bytes(engine, mean_positions) * passes / tokens
    out = {}
    for k, (_, reads) in COMPONENTS.items():
        s = seconds[k] / tokens
        gbps = nbytes[k] / s / GB if reads and s > 0 else None
        out[k] = {"ms_per_token": 1e3 * s, "bytes_per_token": nbytes[k] if reads else None, "gbps": gbps,
                  "pct_of_mem_read": 100 * gbps / mem_gbps if gbps is not None else None}
    return out
