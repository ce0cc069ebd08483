"""Prefetch: the next MoE layer's likely experts loaded into the RAM cache while this layer computes.

Owns when prefetch pays (adaptive: judged by how many of its loads get used), the candidate set (the
next layer's router on this layer's input, wider than top-k, or candidates the caller computed) and
the low-priority loads, which never evict what the current layer pinned. It never computes or reads.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import numpy as np
import torch

from hybrid.experts.backend import HotSet
from hybrid.experts.cache import PREFETCH, ExpertCache

PREFETCH_MIN_USE = 0.3  # adaptive prefetch keeps going while at least this share of its loads gets used
PREFETCH_WINDOW = 64  # prefetches per judgement
PREFETCH_SAMPLE = 32  # while off, prefetch on one layer call in this many
Guess = Callable[[int, torch.Tensor, int], torch.Tensor]  # (layer, x [T, D], width) -> candidate ids [T, width]


class Prefetcher:
    """Starts PREFETCH loads for the next MoE layer after a decode token's layer was submitted.

    width: candidates per prediction; adaptive: judge each window of loads (else always prefetch)."""

    def __init__(self, cache: ExpertCache, next_layer: Mapping[int, int], width: int, adaptive: bool = True):
        self.cache, self.next_layer, self.width, self.adaptive = cache, next_layer, width, adaptive
        self._layer_calls = 0
        self._on, self._mark = True, (0, 0)  # adaptive: on, and where its window began (made, used)
        self._predicted: dict[int, list[int]] = {}  # layer -> the candidates guessed for it (the trace's)

    def pays(self) -> bool:
        """Prefetch while it is right often enough. On fine-grained MoE the next layer's router guesses
        poorly (research notes: ~40-50% coverage), and a wrong guess costs disk bandwidth that demand
        reads need. Adaptive mode judges each window of PREFETCH_WINDOW prefetches: under
        PREFETCH_MIN_USE of them used turns it off, at or over turns it on; while off it still
        prefetches on one layer call in PREFETCH_SAMPLE, so a later window can show guesses have improved."""
        self._layer_calls += 1
        if not self.adaptive:
            return True
        made = sum(s.prefetched for s in self.cache.stats.values())
        used = sum(s.prefetch_used for s in self.cache.stats.values())
        made0, used0 = self._mark
        if made < made0:  # the statistics were reset: start a new window
            self._mark = made0, used0 = made, used
        if made - made0 >= PREFETCH_WINDOW:
            self._on = used - used0 >= PREFETCH_MIN_USE * (made - made0)
            self._mark = (made, used)
        return self._on or self._layer_calls % PREFETCH_SAMPLE == 0

    def after(self, layer: int, x: torch.Tensor, predicted: np.ndarray | None, guess: Guess | None,
              hot: Mapping[int, HotSet]) -> None:
        """layer was just submitted with input x [T, D]: load the next layer's candidates, from
        `predicted` [width] if the caller computed them, else from guess (the router, on x's device:
        a sync the CPU workers need not wait for). Hot experts of the next layer are skipped."""
        if not (self.pays() and (guess is not None or predicted is not None) and x.shape[0] == 1
                and layer in self.next_layer):
            return
        nxt = self.next_layer[layer]
        cand = (predicted if predicted is not None else guess(nxt, x, self.width)[0]).tolist()
        self._predicted[nxt] = cand
        skip = hot.get(nxt, {})
        for e in cand:
            if e not in skip:  # hot experts never need the RAM cache
                self.cache.load(nxt, e, PREFETCH)

    def take_predicted(self, layer: int) -> list[int] | None:
        """The candidates guessed for layer since its last call (None: no guess), for the trace."""
        return self._predicted.pop(layer, None)
