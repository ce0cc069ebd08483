"""The placement classes of checkpoint tensors (attention, router, shared experts, dense MLP, norms,
lm_head, embedding, routed experts) and their bytes in each precision: the one rule the planner counts
by and the engine stores by (which tensors go int8, which stay bf16 under fp32 math). Reads the tensor
table of a config (checkpoint.layout), never weights; decides nothing about placement (placement.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from hybrid.checkpoint.config import ModelConfig
from hybrid.checkpoint.layout import TensorSpec, spec_groups, spec_nbytes

GPU_SIDE = ("attention", "router", "shared_experts", "dense_mlp", "norms", "lm_head")
INT8_CLASSES = ("attention", "shared_experts", "dense_mlp", "lm_head")  # router and norms are never int8

_CLASS_BY_SUBSTRING = ((".mlp.experts.", "routed_experts"), (".self_attn.", "attention"),
                       (".mlp.shared_experts.", "shared_experts"), (".mlp.gate.", "router"), (".mlp.", "dense_mlp"),
                       ("model.embed_tokens.", "embedding"), ("lm_head.", "lm_head"))


def tensor_class(name: str) -> str:
    """The placement class of a checkpoint tensor name."""
    if name.endswith("norm.weight"):  # input/post-attention, q_a/kv_a and the final norm
        return "norms"
    for key, what in _CLASS_BY_SUBSTRING:
        if key in name:
            return what
    raise ValueError(f"no placement class for tensor {name!r}")


def int8_eligible(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the engine stores this GPU-side tensor as int8 weight-only when the plan says int8: the
    2-D weights of INT8_CLASSES, except kv_b_proj (attention reads it as per-head views). One rule for
    the engine and for the sizes the plan counts."""
    return tensor_class(name) in INT8_CLASSES and len(shape) == 2 and "kv_b_proj" not in name


def widen_eligible(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a GPU side on the CPU with fp32 math ('bf16w') keeps this tensor in bf16, as the
    checkpoint stores it, widening it inside each product (linear.widening_linear, and kv_b_proj in
    kernels_cpu.heads' per-head products): the weights that int8 would quantise, kv_b_proj and the
    router's. The rest (norms, the router's bias) is held in fp32. One rule for the engine and for
    the sizes the plan counts."""
    return int8_eligible(name, shape) or (len(shape) == 2 and (tensor_class(name) == "router" or "kv_b_proj" in name))


@dataclass(frozen=True)
class ClassSizes:
    """The bytes of each placement class (routed experts apart), in any precision the plan may give it."""

    specs: dict[str, list[tuple[str, TensorSpec, int]]]  # class -> (name, spec, how many layers hold it)
    routed_bytes: int
    n_experts: int  # routed experts in all MoE layers
    disk_bytes: int

    def nbytes(self, what: str, precision: str) -> int:
        n = 0
        for name, spec, count in self.specs.get(what, []):
            if precision in ("int8", "int8w") and int8_eligible(name, spec.shape):
                b = spec.params + spec.shape[0] * 2  # int8 weights + a bf16 scale per output row
            elif precision in ("bf16w", "int8w") and not widen_eligible(name, spec.shape):  # held in fp32
                b = spec.params * 4
            else:
                b = spec_nbytes(spec)
            n += b * count
        return n


def class_sizes(cfg: ModelConfig) -> ClassSizes:
    """Per placement class, from layout.spec_groups (one representative layer of each kind)."""
    specs: dict[str, list[tuple[str, TensorSpec, int]]] = {}
    routed = disk = 0
    for tensors, count in spec_groups(cfg):
        for name, spec in tensors:
            what = tensor_class(name)
            disk += spec_nbytes(spec) * count
            if what == "routed_experts":
                routed += spec_nbytes(spec) * count
            else:
                specs.setdefault(what, []).append((name, spec, count))
    return ClassSizes(specs, routed, len(cfg.moe_layers) * cfg.n_routed_experts, disk)
