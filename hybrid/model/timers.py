"""Seconds spent by part of the forward pass, for the bench's split (hybrid.runtime.engine's stats()).

Owns the parts' names; Model.forward and the fixed-shape decode step add to them, the engine reads
and clears them. The parts are disjoint stretches of a forward, except attention_proj, the projections' share of attention.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class Timers:
    forward: float = 0.0  # whole forward passes (or decode steps), which hold all the rest
    attention: float = 0.0  # norms and MLA up to the MLP's input (a static decode step: its pre segments whole)
    attention_proj: float = 0.0  # of `attention`: its four projections (q_a, q_b, kv_a, o_proj)
    router: float = 0.0
    submit: float = 0.0  # handing a layer's tokens to the expert backend
    shared: float = 0.0  # the shared expert (and hot experts), while the backend works
    experts_wait: float = 0.0  # waiting for the backend's routed sum
    dense: float = 0.0  # dense layers' MLPs
    lm_head: float = 0.0  # final norm and lm_head
    sampling: float = 0.0  # choosing the next token from the logits (outside the forward passes)

    def clear(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0.0)
