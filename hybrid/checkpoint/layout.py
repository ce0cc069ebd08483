"""The checkpoint's tensor table as the config implies it: every name, dtype and shape.

One definition shared by the checkpoint reader (validation), the synthetic generator (what to
write) and the size report (parameters, bytes on disk). Names are Hugging Face's, as on disk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from hybrid.checkpoint.config import ModelConfig

# safetensors dtype name -> bytes per element
DTYPE_SIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8,
              "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TensorSpec:
    dtypes: tuple[str, ...]  # accepted on-disk dtypes; the first is what the generator writes
    shape: tuple[int, ...]
    params: int  # logical parameters this tensor stands for (INT4 packs count unpacked weights)


def _dense(*shape: int) -> TensorSpec:
    n = 1
    for s in shape:
        n *= s
    return TensorSpec(("BF16",), tuple(shape), n)


def expert_prefix(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}"


def expert_shapes(cfg: ModelConfig, proj: str) -> tuple[int, int]:
    """Logical [out, in] of one routed expert projection."""
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    return (D, I) if proj == "down_proj" else (I, D)


def _int4(out_f: int, in_f: int, group: int) -> dict[str, TensorSpec]:
    return {
        "weight_packed": TensorSpec(("I32",), (out_f, in_f // 8), out_f * in_f),
        "weight_scale": TensorSpec(("BF16",), (out_f, in_f // group), 0),
        # compressed-tensors declares int32; torch.tensor(shape) gives int64: accept both
        "weight_shape": TensorSpec(("I64", "I32"), (2,), 0),
    }


def layer_specs(cfg: ModelConfig, i: int) -> Iterator[tuple[str, TensorSpec]]:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    Q, L, R = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    p = f"model.layers.{i}."
    yield p + "input_layernorm.weight", _dense(D)
    yield p + "post_attention_layernorm.weight", _dense(D)
    yield p + "self_attn.q_a_proj.weight", _dense(Q, D)
    yield p + "self_attn.q_a_layernorm.weight", _dense(Q)
    yield p + "self_attn.q_b_proj.weight", _dense(H * cfg.qk_head_dim, Q)
    yield p + "self_attn.kv_a_proj_with_mqa.weight", _dense(L + R, D)
    yield p + "self_attn.kv_a_layernorm.weight", _dense(L)
    yield p + "self_attn.kv_b_proj.weight", _dense(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), L)
    yield p + "self_attn.o_proj.weight", _dense(D, H * cfg.v_head_dim)
    if not cfg.is_moe_layer(i):
        F = cfg.intermediate_size
        yield p + "mlp.gate_proj.weight", _dense(F, D)
        yield p + "mlp.up_proj.weight", _dense(F, D)
        yield p + "mlp.down_proj.weight", _dense(D, F)
        return
    E, I, S = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
    yield p + "mlp.gate.weight", _dense(E, D)
    yield p + "mlp.gate.e_score_correction_bias", TensorSpec(("F32", "BF16"), (E,), E)
    if cfg.n_shared_experts:
        yield p + "mlp.shared_experts.gate_proj.weight", _dense(S, D)
        yield p + "mlp.shared_experts.up_proj.weight", _dense(S, D)
        yield p + "mlp.shared_experts.down_proj.weight", _dense(D, S)
    for e in range(E):
        for proj in PROJS:
            out_f, in_f = expert_shapes(cfg, proj)
            pre = expert_prefix(i, e, proj)
            if cfg.quant is None:
                yield pre + ".weight", _dense(out_f, in_f)
            else:
                for suffix, spec in _int4(out_f, in_f, cfg.group_size).items():
                    yield f"{pre}.{suffix}", spec


def global_specs(cfg: ModelConfig) -> Iterator[tuple[str, TensorSpec]]:
    V, D = cfg.vocab_size, cfg.hidden_size
    yield "model.embed_tokens.weight", _dense(V, D)
    yield "model.norm.weight", _dense(D)
    yield "lm_head.weight", _dense(V, D)


def tensor_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor the checkpoint must hold, in on-disk order (layers, then globals)."""
    out: dict[str, TensorSpec] = {}
    for i in range(cfg.num_hidden_layers):
        out.update(layer_specs(cfg, i))
    out.update(global_specs(cfg))
    return out


def spec_nbytes(spec: TensorSpec) -> int:
    n = DTYPE_SIZE[spec.dtypes[0]]
    for s in spec.shape:
        n *= s
    return n


@dataclass(frozen=True)
class SizeReport:
    total_params: int
    active_params: int  # per token: everything but the routed experts not chosen
    routed_expert_params: int
    disk_bytes: int  # tensor data as the generator writes it (headers excluded)
    routed_expert_bytes: int
    expert_bytes_per_token: int  # routed expert bytes one decoded token reads


def spec_groups(cfg: ModelConfig) -> list[tuple[list[tuple[str, TensorSpec]], int]]:
    """(tensors, count): the global tensors once, then one dense and one MoE layer each times its
    count (all MoE layers, and all dense ones, have the same shapes): sizes of a model with many
    layers and experts at once."""
    moe = cfg.moe_layers
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    groups = [(list(global_specs(cfg)), 1)]
    return groups + [(list(layer_specs(cfg, ls[0])), len(ls)) for ls in (dense, moe) if ls]


def size_report(cfg: ModelConfig) -> SizeReport:
    """Sizes of the whole model, from spec_groups."""
    n_moe = len(cfg.moe_layers)
    total = disk = routed = routed_bytes = 0
    for specs, count in spec_groups(cfg):
        for name, spec in specs:
            nb = spec_nbytes(spec) * count
            total += spec.params * count
            disk += nb
            if ".mlp.experts." in name:
                routed += spec.params * count
                routed_bytes += nb
    per_expert = routed_bytes // max(1, n_moe * cfg.n_routed_experts)
    active = total - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    return SizeReport(total, active, routed, disk, routed_bytes, per_expert * cfg.num_experts_per_tok * n_moe)
