"""Our forward pass against Hugging Face transformers' DeepseekV3ForCausalLM (fp32, eager) on the same weights."""
from __future__ import annotations

import json

import pytest
import torch

import hybrid
from hybrid.checkpoint.layout import PROJS

transformers = pytest.importorskip("transformers")


def hf_model(engine: hybrid.Engine, ckpt_dir):
    d = json.loads((ckpt_dir / "config.json").read_text())
    rs = d.pop("rope_scaling")
    d.pop("quantization_config")
    d.pop("auto_map", None)
    d["model_type"] = "deepseek_v3"
    d["num_nextn_predict_layers"] = 0
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": d.pop("rope_theta"),
                            **{k: v for k, v in rs.items() if k != "type"}}
    cfg = transformers.DeepseekV3Config(**{k: v for k, v in d.items() if k in transformers.DeepseekV3Config.__dataclass_fields__ or k == "rope_parameters"})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).float().eval()
    sd = {}
    w = engine.model.w
    for name, t in w.items():
        sd[name] = t.float()
    ref = engine.model.experts
    c = engine.config
    for i in c.moe_layers:
        g = torch.stack([torch.cat([ref.dequantized(i, e, "gate_proj"), ref.dequantized(i, e, "up_proj")])
                         for e in range(c.n_routed_experts)])  # [E, 2I, D]
        dn = torch.stack([ref.dequantized(i, e, "down_proj") for e in range(c.n_routed_experts)])  # [E, D, I]
        sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = g
        sd[f"model.layers.{i}.mlp.experts.down_proj"] = dn
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert not missing, missing
    return model


@pytest.mark.parametrize("over", [{}, {"n_group": 4, "topk_group": 2}], ids=["k2-routing", "n_group4"])
def test_logits_match_transformers(make_checkpoint, over, monkeypatch):
    path = make_checkpoint(**over)
    assert len(list(path.glob("model-*.safetensors"))) > 1  # several shards
    engine = hybrid.load(path, backend="reference")
    ref = hf_model(engine, path)
    ids = torch.randint(0, engine.config.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    route, routed = engine.model.route, []  # (layer, the MoE input [T, D]) of this forward pass
    monkeypatch.setattr(engine.model, "route", lambda i, x, k=None: (routed.append((i, x)), route(i, x, k))[1])
    ours = engine.logits(ids)
    with torch.no_grad():
        theirs = ref(ids[None]).logits[0].float()
    tol = 1e-3 * theirs.abs().max()
    assert (ours - theirs).abs().max() <= tol
    assert theirs.argmax(-1).tolist() == ours.argmax(-1).tolist()
    # with n_group, the group limit must change some token's experts (vs a plain top-k of the biased
    # scores), or agreeing with transformers proves nothing about group-limited routing
    cfg, w = engine.config, engine.model.w
    changed = 0
    assert {i for i, _ in routed} == set(cfg.moe_layers)
    for i, x in routed:
        p = f"model.layers.{i}.mlp.gate."
        biased = torch.sigmoid(x.float() @ w[p + "weight"].float().T) + w[p + "e_score_correction_bias"].float()
        plain = biased.topk(cfg.num_experts_per_tok, dim=-1).indices.sort(-1).values  # [T, K]
        chosen = route(i, x)[0].sort(-1).values
        changed += int((plain != chosen).any(-1).sum())
    assert (changed > 0) == (cfg.n_group > 1), changed
