"""config.json parsing: the real Kimi K2 Thinking config, its size report, and errors that name the field."""
from __future__ import annotations

import json

import pytest

from hybrid.checkpoint.config import ConfigError, ModelConfig
from hybrid.checkpoint.layout import size_report, tensor_specs

from tests.conftest import REAL_CONFIG, SHARED_MODEL


def real() -> dict:
    path = SHARED_MODEL / "config.json"
    return json.loads((path if path.exists() else REAL_CONFIG).read_text())


def test_real_config_loads_and_reports_size():
    cfg = ModelConfig.from_dict(real())
    assert cfg.model_type == "kimi_k2" and cfg.moe_layers == list(range(1, 61))
    assert cfg.quant.group_size == 32 and cfg.quant.is_quantized("model.layers.7.mlp.experts.300.down_proj")
    assert not cfg.quant.is_quantized("model.layers.7.mlp.shared_experts.down_proj")
    assert not cfg.quant.is_quantized("model.layers.0.mlp.gate_proj")
    # softmax scale from the research notes: 192^-0.5 * (0.1 ln 64 + 1)^2
    assert cfg.softmax_scale == pytest.approx(0.1446796, rel=1e-6)
    r = size_report(cfg)
    # independent arithmetic: 60 layers x 384 experts x 3 projections x 7168 x 2048
    experts = 60 * 384 * 3 * 7168 * 2048
    assert r.routed_expert_params == experts
    assert 1.02e12 < r.total_params < 1.04e12  # "1.03 T"
    assert 32e9 < r.active_params < 33e9  # "32 B active"
    # one expert on disk: 3 x 7168 x 2048 / 2 bytes of nibbles + bf16 scales per 32 + weight_shape int64 [2]
    per_expert = 3 * (7168 * 2048 // 2 + 7168 * 2048 // 32 * 2 + 16)
    assert r.routed_expert_bytes == 60 * 384 * per_expert
    assert 590e9 < r.disk_bytes < 598e9  # "~594 GB"
    assert r.expert_bytes_per_token == 8 * 60 * per_expert  # ~11.9 GB
    assert len(tensor_specs(cfg)) == 3 + 61 * 9 + 3 + 60 * (5 + 384 * 9)


def test_unknown_keys_ignored_and_deepseek_v3_accepted():
    d = real()
    d["something_new"] = {"x": 1}
    d["model_type"] = "deepseek_v3"
    assert ModelConfig.from_dict(d).model_type == "deepseek_v3"


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("hidden_size"), "hidden_size"),
    (lambda d: d.update(model_type="llama"), "model_type"),
    (lambda d: d.update(num_experts_per_tok=500), "num_experts_per_tok"),
    (lambda d: d.update(n_group=5), "n_group"),
    (lambda d: d.update(topk_group=3), "topk_group"),
    (lambda d: d.update(scoring_func="softmax"), "scoring_func"),
    (lambda d: d.update(rms_norm_eps=-1), "rms_norm_eps"),
    (lambda d: d.update(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (lambda d: d["rope_scaling"].update(type="linear"), "rope_scaling.type"),
    (lambda d: d["quantization_config"].update(format="float-quantized"), "quantization_config"),
    (lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(group_size=48), "group_size"),
    (lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=8), "num_bits"),
    (lambda d: d["quantization_config"].update(ignore=["lm_head"]), "ignore"),
    (lambda d: d.update(vocab_size="big"), "vocab_size"),
    # wrong types and ranges that used to fail later (ZeroDivisionError, AttributeError, a hang)
    (lambda d: d.update(n_group=0), "n_group"),
    (lambda d: d.update(n_group="8"), "n_group"),
    (lambda d: d.update(topk_group=1.5), "topk_group"),
    (lambda d: d.update(first_k_dense_replace="1"), "first_k_dense_replace"),
    (lambda d: d.update(first_k_dense_replace=-1), "first_k_dense_replace"),
    (lambda d: d.update(moe_layer_freq=0), "moe_layer_freq"),
    (lambda d: d.update(moe_layer_freq=True), "moe_layer_freq"),
    (lambda d: d.update(n_shared_experts=None), "n_shared_experts"),
    (lambda d: d.update(hidden_size=7168.0), "hidden_size"),
    (lambda d: d.update(kv_lora_rank=512.5), "kv_lora_rank"),
    (lambda d: d.update(num_hidden_layers=2**40), "num_hidden_layers"),
    (lambda d: d.update(n_routed_experts=8192, num_experts_per_tok=8), "n_routed_experts"),
    (lambda d: d.update(rope_theta=float("inf")), "rope_theta"),
    (lambda d: d.update(routed_scaling_factor="2.8"), "routed_scaling_factor"),
    (lambda d: d.update(eos_token_id="</s>"), "eos_token_id"),
    (lambda d: d.update(rope_scaling="yarn"), "rope_scaling"),
    (lambda d: d["rope_scaling"].update(beta_fast="x"), "rope_scaling.beta_fast"),
    (lambda d: d["rope_scaling"].update(mscale_all_dim=None), "rope_scaling.mscale_all_dim"),
    (lambda d: d["rope_scaling"].update(factor=True), "rope_scaling.factor"),
    (lambda d: d["quantization_config"]["config_groups"].update(group_0=[1, 2]), "config_groups.group_0"),
    (lambda d: d["quantization_config"]["config_groups"]["group_0"].update(weights="int4"), "config_groups.group_0"),
    (lambda d: d["quantization_config"].update(config_groups=["group_0"]), "config_groups"),
    (lambda d: d["quantization_config"]["ignore"].append("re:("), "re:\\("),
])
def test_bad_fields_are_named(edit, field):
    d = real()
    edit(d)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_dict(d, source="x/config.json")


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match=r"config.json: not UTF-8 text"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match=r"config.json: is a directory"):
        ModelConfig.from_file(tmp_path / "config.json" / "..")
