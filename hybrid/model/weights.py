"""The GPU side's weights, resolved once from their Hugging Face names into one frozen record per layer.

Owns the naming scheme (`model.layers.{i}.self_attn.q_a_proj.weight`, ...): field names are the HF
module names, so k2.py reads `layer.self_attn.q_a_proj` and never builds a string per token. Holds
the loaded tensors themselves (and views of them); must not convert, copy or compute.
Letters as in k2.py: D hidden, H heads, Q q_lora_rank, L kv_lora_rank, P nope, R rope, V v_head_dim.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from hybrid.checkpoint.config import ModelConfig
from hybrid.model.linear import Weight


@dataclass(frozen=True)
class AttentionWeights:
    """MLA's projections (`self_attn.*`), and kv_b_proj's per-head halves as views."""
    q_a_proj: Weight  # [Q, D]
    q_a_layernorm: torch.Tensor  # [Q]
    q_b_proj: Weight  # [H * (P + R), Q]
    kv_a_proj_with_mqa: Weight  # [L + R, D]
    kv_a_layernorm: torch.Tensor  # [L]
    kv_b_proj: torch.Tensor  # [H * (P + V), L]; never int8 (read as the views below)
    o_proj: Weight  # [D, H * V]
    w_uk: torch.Tensor  # [H, P, L]: keys out of the latent
    w_uv: torch.Tensor  # [H, V, L]: values out of the latent
    kv_b_heads: torch.Tensor  # [H, P + V, L]: both, per head (what the CPU's head products read)


@dataclass(frozen=True)
class MLPWeights:
    """A SwiGLU MLP: a dense layer's `mlp.*`, or an MoE layer's `mlp.shared_experts.*`."""
    gate_proj: Weight  # [I, D]
    up_proj: Weight  # [I, D]
    down_proj: Weight  # [D, I]


@dataclass(frozen=True)
class RouterWeights:
    """The sigmoid router (`mlp.gate.*`)."""
    weight: torch.Tensor  # [E, D]
    e_score_correction_bias: torch.Tensor  # [E]


@dataclass(frozen=True)
class MoEWeights:
    """What an MoE layer's `mlp` holds on the GPU side; the routed experts belong to the expert backend."""
    gate: RouterWeights
    shared_experts: MLPWeights | None  # None with n_shared_experts = 0


@dataclass(frozen=True)
class LayerWeights:
    input_layernorm: torch.Tensor  # [D]
    self_attn: AttentionWeights
    post_attention_layernorm: torch.Tensor  # [D]
    mlp: MLPWeights | MoEWeights  # dense layers: MLPWeights


@dataclass(frozen=True)
class ModelWeights:
    embed_tokens: torch.Tensor  # [vocab, D], wherever the engine put it (host RAM)
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor  # [D]
    lm_head: Weight  # [vocab, D]

    @classmethod
    def from_names(cls, cfg: ModelConfig, w: Mapping[str, Weight]) -> "ModelWeights":
        """Resolve a {Hugging Face name: weight} mapping (the routed experts' tensors not needed)."""
        return cls(embed_tokens=w["model.embed_tokens.weight"],
                   layers=tuple(_layer(cfg, w, i) for i in range(cfg.num_hidden_layers)),
                   norm=w["model.norm.weight"], lm_head=w["lm_head.weight"])


def _layer(cfg: ModelConfig, w: Mapping[str, Weight], i: int) -> LayerWeights:
    p = f"model.layers.{i}."
    if cfg.is_moe_layer(i):
        mlp: MLPWeights | MoEWeights = MoEWeights(
            gate=RouterWeights(w[p + "mlp.gate.weight"], w[p + "mlp.gate.e_score_correction_bias"]),
            shared_experts=_mlp(w, p + "mlp.shared_experts.") if cfg.n_shared_experts else None)
    else:
        mlp = _mlp(w, p + "mlp.")
    return LayerWeights(input_layernorm=w[p + "input_layernorm.weight"], self_attn=_attention(cfg, w, p + "self_attn."),
                        post_attention_layernorm=w[p + "post_attention_layernorm.weight"], mlp=mlp)


def _attention(cfg: ModelConfig, w: Mapping[str, Weight], p: str) -> AttentionWeights:
    H, P, L = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
    kv_b = w[p + "kv_b_proj.weight"]
    w_kv_b = kv_b.view(H, P + cfg.v_head_dim, L)
    return AttentionWeights(q_a_proj=w[p + "q_a_proj.weight"], q_a_layernorm=w[p + "q_a_layernorm.weight"],
                            q_b_proj=w[p + "q_b_proj.weight"], kv_a_proj_with_mqa=w[p + "kv_a_proj_with_mqa.weight"],
                            kv_a_layernorm=w[p + "kv_a_layernorm.weight"], kv_b_proj=kv_b,
                            o_proj=w[p + "o_proj.weight"], w_uk=w_kv_b[:, :P], w_uv=w_kv_b[:, P:],
                            kv_b_heads=w_kv_b)


def _mlp(w: Mapping[str, Weight], p: str) -> MLPWeights:
    return MLPWeights(w[p + "gate_proj.weight"], w[p + "up_proj.weight"], w[p + "down_proj.weight"])
