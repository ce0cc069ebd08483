"""Model configuration from a checkpoint's config.json (DeepSeek-V3 / Kimi K2 field names).

Owns parsing and validation of the fields the math needs and the INT4 quantization config.
Unknown keys are ignored; missing or inconsistent ones raise ConfigError naming the field.
It must not touch weights: sizes here are computed from the config alone.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """config.json is missing a field, has a wrong value, or describes something unsupported."""


@dataclass(frozen=True)
class QuantConfig:
    """compressed-tensors pack-quantized INT4, symmetric, group-wise (W4A16)."""

    num_bits: int = 4
    group_size: int = 32
    ignore: tuple[str, ...] = ()

    def is_quantized(self, module: str) -> bool:
        """True when Linear `module` (e.g. 'model.layers.3.mlp.experts.7.up_proj') is packed INT4."""
        for rule in self.ignore:
            if rule.startswith("re:"):
                if re.match(rule[3:], module):
                    return False
            elif rule == module:
                return False
        return True


_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_routed_experts", "num_experts_per_tok", "rms_norm_eps", "rope_theta",
    "max_position_embeddings",
)
# integer fields and the range each may take: far past Kimi K2 (61 layers, 384 experts, D 7168, 256K
# context), small enough that sizes and per-layer loops stay finite (a typo must not hang `info`)
_INT_RANGES = {
    "vocab_size": (1, 1 << 24), "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 20),
    "moe_intermediate_size": (1, 1 << 20), "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024),
    "q_lora_rank": (1, 1 << 16), "kv_lora_rank": (1, 1 << 16), "qk_nope_head_dim": (1, 1 << 12),
    "qk_rope_head_dim": (1, 1 << 12), "v_head_dim": (1, 1 << 12), "n_routed_experts": (1, 4096),
    "num_experts_per_tok": (1, 4096), "max_position_embeddings": (1, 1 << 24), "n_shared_experts": (0, 64),
    "first_k_dense_replace": (0, 1024), "moe_layer_freq": (1, 1024), "n_group": (1, 4096), "topk_group": (1, 4096),
    "num_nextn_predict_layers": (0, 64),
}
_FLOATS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor")  # finite and > 0
_YARN_NUMBERS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")  # optional in rope_scaling


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # dense MLP (layer 0)
    moe_intermediate_size: int  # I, per expert
    num_hidden_layers: int
    num_attention_heads: int  # H
    q_lora_rank: int  # Q
    kv_lora_rank: int  # L
    qk_nope_head_dim: int  # P
    qk_rope_head_dim: int  # R
    v_head_dim: int  # V
    n_routed_experts: int  # E
    num_experts_per_tok: int  # K
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    model_type: str = "kimi_k2"
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    rope_scaling: dict | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    quant: QuantConfig | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object at the top level")
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        names = {f.name for f in fields(cls)} - {"quant", "raw"}
        kw = {k: v for k, v in d.items() if k in names}
        eos = kw.get("eos_token_id")
        if isinstance(eos, list):
            kw["eos_token_id"] = eos[0] if eos else None
        kw["quant"] = _parse_quant(d.get("quantization_config"), source)
        try:
            return cls(**kw, raw=dict(d))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:  # a field of the wrong JSON type that the dataclass could not take
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found; a checkpoint directory needs its config.json") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-download the file") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a config.json file") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); re-download the file") from None
        return cls.from_dict(d, source=str(path))

    def __post_init__(self) -> None:
        if self.model_type not in ("kimi_k2", "deepseek_v3"):
            raise ConfigError(f"model_type {self.model_type!r} is not supported (expected 'kimi_k2' or 'deepseek_v3')")
        for name, (lo, hi) in _INT_RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"field {name} must be an integer in {lo}..{hi}, got {v!r}")
        for name in _FLOATS:
            v = getattr(self, name)
            if not _is_number(v) or v <= 0:
                raise ConfigError(f"field {name} must be a finite number above 0, got {v!r}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"field {name} must be a token id (an integer >= 0) or null, got {v!r}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts ({self.n_routed_experts})")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"n_routed_experts ({self.n_routed_experts}) is not divisible by n_group ({self.n_group})")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"topk_group ({self.topk_group}) must lie in 1..n_group ({self.n_group})")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ConfigError("n_group > 1 needs at least 2 experts per group (group score = sum of top 2)")
        if self.scoring_func != "sigmoid":
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported (Kimi K2 / DeepSeek-V3 use 'sigmoid')")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (expected 'silu')")
        if self.attention_bias:
            raise ConfigError("attention_bias=true is not supported (Kimi K2 has none)")
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=true is not supported (Kimi K2 has an untied lm_head)")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even (rope rotates pairs)")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(f"first_k_dense_replace ({self.first_k_dense_replace}) must lie in 0..num_hidden_layers")
        rs = self.rope_scaling
        if rs is not None:
            if not isinstance(rs, dict):
                raise ConfigError(f"rope_scaling must be an object (YaRN's type, factor, ...) or null, got {rs!r}")
            kind = rs.get("type", rs.get("rope_type"))
            if kind != "yarn":
                raise ConfigError(f"rope_scaling.type {kind!r} is not supported (expected 'yarn' or no rope_scaling)")
            for k in ("factor", "original_max_position_embeddings"):
                if not _is_number(rs.get(k)) or rs[k] <= 0:
                    raise ConfigError(f"rope_scaling.{k} must be a positive number, got {rs.get(k)!r}")
            for k in _YARN_NUMBERS:
                if k in rs and not _is_number(rs[k]):
                    raise ConfigError(f"rope_scaling.{k} must be a finite number, got {rs[k]!r}")
        q = self.quant
        if q is not None:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                dim = self.hidden_size if proj != "down_proj" else self.moe_intermediate_size
                if dim % q.group_size or dim % 8:
                    raise ConfigError(f"quantization_config group_size {q.group_size} does not divide {proj} input dim {dim}")
            probe = "model.layers.1.self_attn.q_a_proj"
            if q.is_quantized(probe) or q.is_quantized("model.layers.1.mlp.shared_experts.up_proj") or q.is_quantized("lm_head"):
                raise ConfigError("quantization_config.ignore must exclude attention, shared experts and lm_head; "
                                  "only routed experts may be INT4 here")
            if not q.is_quantized("model.layers.1.mlp.experts.0.up_proj"):
                raise ConfigError("quantization_config.ignore excludes the routed experts; nothing would be INT4")

    # ---- derived ------------------------------------------------------------------------
    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def group_size(self) -> int:
        return self.quant.group_size if self.quant else 0

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN (always applied, as HF and vLLM do)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _parse_quant(q: Any, source: str) -> QuantConfig | None:
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"{source}: quantization_config must be an object")
    if q.get("quant_method") != "compressed-tensors" or q.get("format") != "pack-quantized":
        raise ConfigError(f"{source}: quantization_config {q.get('quant_method')!r}/{q.get('format')!r} is not supported; "
                          "only compressed-tensors 'pack-quantized' INT4 (as Kimi K2 Thinking ships) is")
    groups = q.get("config_groups") or {}
    if not isinstance(groups, dict) or len(groups) != 1:
        n = len(groups) if isinstance(groups, dict) else type(groups).__name__
        raise ConfigError(f"{source}: quantization_config.config_groups must be an object holding exactly one group, "
                          f"got {n}")
    (gname, g), = groups.items()
    if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
        raise ConfigError(f"{source}: quantization_config.config_groups.{gname} must be an object with a \"weights\" "
                          f"object, got {g!r}")
    w = g["weights"]
    where = f"{source}: quantization_config.config_groups.{gname}.weights"
    if w.get("num_bits") != 4 or w.get("type") != "int" or w.get("symmetric") is not True:
        raise ConfigError(f"{where}: expected num_bits 4, type 'int', symmetric true")
    if w.get("strategy") != "group" or type(w.get("group_size")) is not int or w["group_size"] <= 0:
        raise ConfigError(f"{where}: expected strategy 'group' with a positive integer group_size")
    if g.get("input_activations") is not None:
        raise ConfigError(f"{source}: quantization_config.config_groups.{gname}.input_activations must be null (W4A16)")
    ignore = q.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(s, str) for s in ignore):
        raise ConfigError(f"{source}: quantization_config.ignore must be a list of strings")
    for rule in ignore:
        if rule.startswith("re:"):
            try:
                re.compile(rule[3:])
            except re.error as e:
                raise ConfigError(f"{source}: quantization_config.ignore rule {rule!r} is not a valid regular "
                                  f"expression ({e})") from None
    return QuantConfig(num_bits=4, group_size=w["group_size"], ignore=tuple(ignore))
