"""Sampling parameters and next-token sampling from one row of logits.

Owns: SamplingParams (validated, K2 Thinking defaults: temperature 1.0, top_p 1.0), the filter order
temperature -> top_k -> top_p -> min_p (as transformers applies its warpers), and seeded draws on a CPU
generator so a seed reproduces the same tokens whatever device made the logits, and StopMatcher for
stop strings in streamed text. Must not: know token ids; the decode loop and stop ids live in generate.py.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


class SamplingError(ValueError):
    """A sampling parameter is out of range (the message names it), or the logits are unusable."""


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # Moonshot's recommendation for K2 Thinking; 0 = greedy
    top_p: float = 1.0  # 1.0 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None  # None: a fresh random seed per request
    max_tokens: int | None = None  # None: until a stop or the context is full
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            ("temperature", isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
             and math.isfinite(self.temperature) and self.temperature >= 0, "a finite number >= 0 (0 = greedy)"),
            ("top_p", isinstance(self.top_p, (int, float)) and not isinstance(self.top_p, bool)
             and 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("min_p", isinstance(self.min_p, (int, float)) and not isinstance(self.min_p, bool)
             and 0 <= self.min_p <= 1, "in [0, 1] (0 = off)"),
            ("seed", self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63), "None or an integer in [0, 2**63)"),
            ("max_tokens", self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
             "None or an integer >= 1"),
            ("stop", isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
             "a list of non-empty strings"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise SamplingError(f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self) -> torch.Generator:
        """CPU generator seeded with `seed` (or randomly when seed is None)."""
        g = torch.Generator(device="cpu")
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def _checked(logits: torch.Tensor) -> torch.Tensor:
    """logits [V], refused when not one row, or holding NaN or no finite value (a broken forward pass)."""
    if logits.dim() != 1:
        raise SamplingError(f"logits must be one row [V], got shape {tuple(logits.shape)}")
    x = logits.detach()
    if bool(torch.isnan(x).any()) or not bool(torch.isfinite(x).any()):
        raise SamplingError("logits contain NaN or no finite value")
    return x


def first_max(logits: torch.Tensor) -> tuple[int, float]:
    """(index, value) of the first maximum of logits [V] (a NaN where there is one), read back in one transfer
    from their device. fp32 on the CPU through NumPy's argmax: after a CPU decode step (the caches cold) torch's
    four ops took 0.21 ms a token on a 2-core Xeon, NumPy's 0.11."""
    x = logits.detach()
    if x.device.type == "cpu" and x.dtype == torch.float32:
        row = x.numpy()
        index = int(row.argmax())
        return index, float(row[index])
    i = torch.argmax(x)
    index, value = torch.stack((i.double(), x[i].double())).tolist()
    return int(index), value


def _greedy(logits: torch.Tensor) -> int:
    """first_max's index of logits [V]; _checked's refusals (argmax lands on a NaN when there is one; the
    maximum is -inf when nothing is finite)."""
    if logits.dim() != 1:
        raise SamplingError(f"logits must be one row [V], got shape {tuple(logits.shape)}")
    index, value = first_max(logits)
    if math.isnan(value) or value == math.inf:  # NaN, or +inf where the full check tells the cases apart
        _checked(logits)
    if value == -math.inf:
        raise SamplingError("logits contain NaN or no finite value")
    return index


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampled from: logits [V] -> probabilities [V] (float32, CPU) after temperature,
    top_k (ties with the k-th value are kept), top_p (smallest set reaching p) and min_p. Greedy
    (temperature 0) gives a one-hot on the first maximum."""
    x = _checked(logits).to(device="cpu", dtype=torch.float32)
    if params.greedy:
        probs = torch.zeros_like(x)
        probs[int(torch.argmax(x))] = 1.0
        return probs
    x = x / params.temperature
    if 0 < params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, -math.inf)
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly ahead of each token
        drop = before >= params.top_p
        drop[0] = False  # the most likely token always stays
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from logits [V] (any device, any float dtype). The generator must be a CPU
    generator (params.make_generator()); the same seed gives the same ids."""
    if params.greedy:
        return _greedy(logits)
    probs = filtered_probs(logits, params)
    return int(torch.multinomial(probs, 1, generator=generator))


class StopMatcher:
    """Finds stop strings in streamed text. feed() returns the text safe to show now (holding back a
    tail that could begin a stop string) and whether a stop was hit; the stop string itself and all
    after it are dropped. flush() returns the held-back tail at the end of a stream without a stop."""

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(stops)
        self._buf = ""
        self.stopped: str | None = None  # the stop string that ended the stream

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped is not None:
            return "", True
        buf = self._buf + text
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            i, self.stopped = min(hits)
            self._buf = ""
            return buf[:i], True
        keep = 0
        for k in range(min(len(buf), max(map(len, self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(buf[-k:]) for s in self.stops):
                keep = k
                break
        self._buf = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out
