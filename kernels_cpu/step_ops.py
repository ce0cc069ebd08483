"""The small steps of a CPU decode step between its GEMVs: RMSNorm and the router's choice.

Owns rms_norm (and its loop for Numba callers, rms_norm_into) and route. A decode step streams hundreds of MB through the caches between these
steps, so each starts with its code and data evicted. In torch an RMSNorm (seven ops: pow, mean,
add, rsqrt, two products, a cast) then took 170-230 us on a 2-core Xeon, ~25 us warm; one Numba
loop took ~28 us cold. The router's steps after its product (sigmoid, bias, top-k, gather, normalise,
scale) took ~0.5 ms a layer in torch. Same math in fp32; only the order of the sum of squares
differs, and sigmoid's last bit may. Pure functions on arrays; imports nothing from hybrid/.
"""
from __future__ import annotations

import numpy as np
from numba import njit

FASTMATH = {"reassoc", "contract"}  # a vectorised sum; NaN and inf keep their meaning, sqrt stays exact
MAX_ROWS = 8  # rows per call: past this torch's parallel forms are the faster ones


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def rms_norm_into(x, w, eps, out):
    """rms_norm's loop for @njit callers: x f32 [T, D], w f32 [D], eps f32 -> out f32 [T, D]."""
    T, D = x.shape
    for t in range(T):
        s = np.float32(0.0)
        for i in range(D):
            s += x[t, i] * x[t, i]
        r = np.float32(1.0) / np.sqrt(s / np.float32(D) + eps)
        for i in range(D):
            out[t, i] = w[i] * (x[t, i] * r)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x f32 [T <= MAX_ROWS, D], w f32 [D] -> w * x / sqrt(mean(x^2) + eps) per row, f32 [T, D] (new)."""
    if x.ndim != 2 or x.dtype != np.float32 or w.dtype != np.float32 or w.shape != (x.shape[1],) \
            or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"rms_norm: want x float32 [T <= {MAX_ROWS}, D] and w float32 [D], got x {x.dtype} "
                         f"{x.shape}, w {w.dtype} {w.shape}")
    out = np.empty(x.shape, np.float32)
    rms_norm_into(np.ascontiguousarray(x), np.ascontiguousarray(w), np.float32(eps), out)
    return out


@njit(nogil=True, cache=True)
def route_into(logits, bias, K, norm, factor, ids, weights):
    # per row: sigmoid scores; the K largest of scores + bias, largest first (the first index on a
    # tie); their scores, normalised to sum 1 (norm), times factor
    T, E = logits.shape
    scores = np.empty(E, np.float32)
    choice = np.empty(E, np.float32)
    taken = np.empty(E, np.bool_)
    for t in range(T):
        for e in range(E):
            scores[e] = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits[t, e]))
            choice[e] = scores[e] + bias[e]
            taken[e] = False
        total = np.float32(0.0)
        for k in range(K):
            best = -1
            for e in range(E):
                if not taken[e] and (best < 0 or choice[e] > choice[best]):
                    best = e
            taken[best] = True
            ids[t, k] = best
            weights[t, k] = scores[best]
            total += scores[best]
        for k in range(K):
            if norm:
                weights[t, k] = weights[t, k] / (total + np.float32(1e-20))
            weights[t, k] *= factor


def route(logits: np.ndarray, bias: np.ndarray, k: int, norm: bool, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3's router after its product, with one expert group: logits f32 [T <= MAX_ROWS, E],
    bias f32 [E] (for the choice only) -> (ids int64 [T, k], weights f32 [T, k]): the k experts with
    the largest sigmoid(logits) + bias, largest first, weighted by their sigmoid(logits), normalised
    to sum 1 where norm, times factor."""
    if logits.ndim != 2 or logits.dtype != np.float32 or bias.dtype != np.float32 or bias.shape != (logits.shape[1],) \
            or not 1 <= logits.shape[0] <= MAX_ROWS or not 1 <= k <= logits.shape[1]:
        raise ValueError(f"route: want logits float32 [T <= {MAX_ROWS}, E], bias float32 [E] and 1 <= k <= E, got "
                         f"logits {logits.dtype} {logits.shape}, bias {bias.dtype} {bias.shape}, k {k}")
    ids = np.empty((logits.shape[0], k), np.int64)
    weights = np.empty((logits.shape[0], k), np.float32)
    route_into(np.ascontiguousarray(logits), np.ascontiguousarray(bias), k, norm, np.float32(factor), ids, weights)
    return ids, weights
