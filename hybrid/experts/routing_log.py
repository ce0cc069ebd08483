"""What the routers chose: per-layer routing counts and the optional JSON-lines routing trace.

Owns counting each (token, expert) pair a layer call computes (the counts choose the hot experts;
routing_stats.py keeps them across sessions) and writing one trace record per layer call
(scripts/replay_traces.py reads them). It never computes or moves expert weights.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TextIO

import numpy as np


class RoutingLog:
    """counts: layer -> int64 [E], starting from `initial` (saved by an earlier session) or zeros.
    trace: an open text file that receives one JSON line per layer call, closed by close()."""

    def __init__(self, moe_layers: list[int], n_experts: int, trace: TextIO | None = None,
                 initial: Mapping[int, np.ndarray] | None = None):
        self.counts: dict[int, np.ndarray] = {layer: np.zeros(n_experts, dtype=np.int64) for layer in moe_layers}
        for layer, c in (initial or {}).items():
            self.counts[layer] = np.asarray(c, dtype=np.int64).copy()
        self.trace = trace
        self._first = moe_layers[0] if moe_layers else -1
        self._token = 0  # tokens the first MoE layer has seen: the trace's position

    def record(self, layer: int, ids: np.ndarray, w: np.ndarray, predicted: list[int] | None = None) -> None:
        """One layer call: ids int64 [T, K], w fp32 [T, K] (a 0 drops a pair); predicted: the
        candidates prefetch guessed for this layer, if any."""
        np.add.at(self.counts[layer], ids[w != 0], 1)
        if layer == self._first:
            self._token += ids.shape[0]
        if self.trace is None:
            return
        rec = {"layer": layer, "token": self._token - ids.shape[0], "experts": ids.tolist(),
               "weights": np.round(w, 5).tolist(), "predicted": predicted}
        self.trace.write(json.dumps(rec) + "\n")

    def counted(self, layer: int, tokens: int) -> None:
        """A layer call of `tokens` tokens whose pairs the caller added to counts[layer] itself (only
        without a trace: ExpertBackend.decode_table)."""
        if layer == self._first:
            self._token += tokens

    def close(self) -> None:
        if self.trace is not None:
            self.trace.close()
