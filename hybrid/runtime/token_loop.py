"""Prefill/decode loop: token ids in, a stream of Step events out.

Owns the KV cache across one request's steps and the stop conditions (max tokens, stop ids).
Sampling is a function passed in; rendering, tokenizing and parsing happen in the consumers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from hybrid.model.k2 import Cache, Model
from hybrid.model.sampling import first_max

Sampler = Callable[[torch.Tensor], int]  # logits [vocab] -> token id


@dataclass(frozen=True)
class Step:
    token: int
    index: int  # 0-based position among the generated tokens
    prefill_tokens: int  # tokens of the prompt that were computed (not reused from the cache)
    elapsed_s: float  # since the request started
    finish: str | None = None  # 'stop' (a stop id) or 'length' on the last step


def greedy(logits: torch.Tensor) -> int:
    """The first maximum's index (sampling.first_max), without sampling's refusals of broken logits."""
    return first_max(logits)[0]


@torch.inference_mode()
def generate(model: Model, cache: Cache, prompt: list[int], max_new_tokens: int,
             sample: Sampler = greedy, stop_ids: frozenset[int] = frozenset(),
             prefill_chunk: int | None = None, should_stop: Callable[[], bool] | None = None,
             decode_step: Callable[[int], torch.Tensor] | None = None) -> Iterator[Step]:
    """Prefill what the cache does not already hold of `prompt`, then decode one token per step.

    The cache must hold a prefix of `prompt` (cache.length <= len(prompt)); reusing it is the caller's call.
    prefill_chunk: prefill at most this many tokens per forward pass (each chunk attends to the cache
    the earlier ones wrote), so activations stay bounded however long the prompt; None: all at once.
    should_stop: asked between prefill chunks; True ends the generation there, with nothing yielded
    (what was prefilled stays in the cache, cache.length says how much).
    decode_step: token -> logits [1, vocab] for one token at cache.length, advancing it (e.g.
    decode_step.StaticDecoder(model, cache).step); None: model.forward.
    """
    t0 = time.perf_counter()
    if max_new_tokens < 1:
        return
    start = min(cache.length, len(prompt) - 1)  # recompute at least the last prompt token for its logits
    cache.truncate(start)
    new = torch.tensor(prompt[start:], dtype=torch.long)
    chunk = prefill_chunk or len(new)
    for c0 in range(0, len(new), chunk):
        if c0 and should_stop is not None and should_stop():
            return
        logits = model.forward(new[c0:c0 + chunk], cache, last_only=True)[-1]
    for i in range(max_new_tokens):
        t_sample = time.perf_counter()
        tok = sample(logits)
        model.times.sampling += time.perf_counter() - t_sample
        last = i + 1 == max_new_tokens or cache.length >= cache.max_len  # context full: no room for this token
        finish = "stop" if tok in stop_ids else ("length" if last else None)
        yield Step(tok, i, len(new), time.perf_counter() - t0, finish)
        if finish:
            return
        logits = (decode_step(tok) if decode_step else model.forward(torch.tensor([tok]), cache, last_only=True))[-1]
