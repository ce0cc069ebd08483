"""The RAM bandwidth where a model sits, for `kimi-hybrid bench`: a decode token's bytes read in place.

Owns building one token's byte spans from a loaded Engine (its non-expert weights as the engine holds them
and, for each MoE layer, as many routed experts as a token uses, drawn at random, in layer order) and
timing their read with the RAM probe's loops (kernels_cpu.membw.read_spans_gbps). The probe's own buffer
measures wherever that buffer lands; on a VM the guest's memory is not all equally fast (runtime/probe.py:
three tiers, 21 / 29 / 40 GB/s, on a 2-core Xeon VM), so a decode's share of the probe mixes the engine's
efficiency with two placements. The same bytes the token reads, read where they are, give the ceiling for
that placement. Measures only; engine_bench reports the figure beside the probe's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kernels_cpu.membw import read_spans_gbps

from hybrid.bench.account import held_weights

if TYPE_CHECKING:
    from hybrid.runtime.engine import Engine

MIN_BYTES = 256 << 20  # a token's bytes below this: a cache figure, not a RAM one (none is reported)
MIN_COMPONENT = 32 << 20  # by_component leaves out smaller components (their bytes stay in the caches)
_HEAD = 1 << 30  # sort key past every layer: the final norm and lm_head come last


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else _HEAD


def weight_spans(engine: Engine) -> list[tuple[int, str, int, int]]:
    """(layer, account component, address, bytes) of each non-expert weight a decoded token reads as the
    engine holds them (the embedding, read one row a token, left out), in layer order."""
    return sorted(((_layer_of(name), what, t.data_ptr(), t.nbytes) for name, what, t in held_weights(engine)
                   if t.device.type == "cpu" and t.nbytes), key=lambda s: s[0])


def _expert_spans(engine: Engine, rng: np.random.Generator) -> list[tuple[int, str, int, int]] | None:
    """As weight_spans, for num_experts_per_tok routed experts of each MoE layer drawn by rng (six parts
    each); None where they are not mapped here (ExpertBackend.mapped_tables) or the engine runs its
    non-expert side on a GPU."""
    tables = engine.model.experts.mapped_tables
    if tables is None or engine.device.type != "cpu":  # a GPU reads its side: no one RAM figure for the token
        return None
    out, k = [], engine.config.num_experts_per_tok
    for layer, table in tables.items():
        nb = table.part_nbytes
        for e in rng.choice(table.num_experts, size=k, replace=False):
            for m, (arena, off) in enumerate(table.loc[e]):
                out.append((layer, "experts", table.arenas[arena].ctypes.data + int(off), int(nb[m])))
    return out


def _arrays(spans: list[tuple[int, str, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([s[2] for s in spans], np.int64), np.array([s[3] for s in spans], np.int64)


def token_spans(engine: Engine, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """One decode token's bytes layer by layer as the forward reads them (addresses, lengths; int64): each
    layer's non-expert weights (in the engine's order), then that layer's routed experts (num_experts_per_tok
    of them, drawn by rng), the head last. None where _expert_spans has none (experts not mapped here, or a
    GPU side)."""
    experts = _expert_spans(engine, rng)
    if experts is None:
        return None
    return _arrays(sorted(weight_spans(engine) + experts, key=lambda s: s[0]))  # stable: weights first


def in_place_gbps(engine: Engine, rng: np.random.Generator, tokens: int = 2) -> float | None:
    """The best read GB/s over `tokens` draws of a decode token's bytes (token_spans), each read in place by
    the probe's loops (the best of their shapes); None where token_spans has none or a token reads less
    than MIN_BYTES (a small model's bytes sit in the CPU caches: no RAM figure). Each draw reads other
    experts, so a read does not find the last one's in the caches."""
    best = None
    for _ in range(tokens):
        got = token_spans(engine, rng)
        if got is None or got[1].sum() < MIN_BYTES:
            return None
        g = read_spans_gbps(*got, reps=1)
        best = g if best is None else max(best, g)
    return best


def by_component(engine: Engine, rng: np.random.Generator, flush: np.ndarray,
                 reads: int = 2) -> dict[str, float] | None:
    """account component -> GB/s of its weights' bytes for one token (every layer's; for the routed experts,
    a draw of its own as in token_spans) read in place, the best of `reads` reads of each load shape, each
    after a read of `flush` (a buffer past the caches: the probe's) so that none starts from the caches;
    components under MIN_COMPONENT bytes left out (a cache figure). Weights only: attention math's account
    also counts the latent cache, which is not read here. None as in_place_gbps. What the engine's own
    GB/s for a component is measured against."""
    experts = _expert_spans(engine, rng)
    if experts is None:
        return None
    spans = weight_spans(engine) + experts
    if sum(s[3] for s in spans) < MIN_BYTES:
        return None
    groups: dict[str, list] = {}
    for span in spans:
        groups.setdefault(span[1], []).append(span)
    return {what: read_spans_gbps(*_arrays(group), reps=reads, flush=flush)
            for what, group in groups.items() if sum(s[3] for s in group) >= MIN_COMPONENT}
