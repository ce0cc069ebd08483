"""The placement planner on the real K2 Thinking config and hypothetical workstations.

Sizes are recomputed here from the config's numbers (not through hybrid.checkpoint.layout or the planner);
only the planner's policy constants (GPU reserve, RAM reserve) are imported. GB = 1e9 bytes.
"""
from __future__ import annotations

import dataclasses
import re

import pytest

from hybrid.checkpoint.config import ModelConfig
from hybrid.runtime.hardware import Hardware, detect
from hybrid.checkpoint.layout import size_report
import hybrid.runtime.placement as placement
from hybrid.runtime.placement import GPU_RESERVE, GPU_SIDE, PlanError, ram_reserve
from hybrid.runtime.projection import projected_decode_tps
from hybrid.synth.writer import preset_config

from tests.conftest import REAL_CONFIG

GB = 10**9
CONTEXT = 8192  # the hand-worked figures below are for an 8K context (the default is the plan's: tests at the end)


def plan(cfg: ModelConfig, hw: Hardware, **options) -> placement.Plan:
    return placement.plan(cfg, hw, **{"context": CONTEXT, **options})


@pytest.fixture(scope="module")
def k2() -> ModelConfig:
    return ModelConfig.from_file(REAL_CONFIG)


# ---- K2 Thinking sizes, by hand from config.json ------------------------------------------
D, H, Q, L, R, P, V_HEAD = 7168, 64, 1536, 512, 64, 128, 128
F, I, E, K, VOCAB = 18432, 2048, 384, 8, 163840
LAYERS, MOE = 61, 60

ATTN = D * Q + H * (P + R) * Q + (L + R) * D + H * (P + V_HEAD) * L + D * H * V_HEAD  # params per layer
ATTN_ROWS = Q + H * (P + R) + (L + R) + H * (P + V_HEAD) + D  # output rows: int8 keeps one bf16 scale each
SHARED, SHARED_ROWS = 3 * D * I, 2 * I + D
DENSE, DENSE_ROWS = 3 * D * F, 2 * F + D
NORMS = LAYERS * (2 * D + Q + L) + D
ROUTER_BF16 = MOE * (E * D * 2 + E * 4)  # gate weight bf16, e_score_correction_bias fp32
HEAD = VOCAB * D
EXPERT = 3 * (D * I // 2 + D * I // 32 * 2 + 16)  # int4 nibbles + bf16 scale per 32 + int64 weight_shape
SLOT = -(-EXPERT // 4096) * 4096
KV_VALUES = LAYERS * (L + R)  # 576 per layer

BF16_SIDE = 2 * (LAYERS * ATTN + MOE * SHARED + DENSE + NORMS + HEAD) + ROUTER_BF16
KV_B, KV_B_ROWS = H * (P + V_HEAD) * L, H * (P + V_HEAD)  # kv_b_proj stays bf16 under int8 (per-head views)
INT8_SIDE = (LAYERS * (ATTN - KV_B + 2 * (ATTN_ROWS - KV_B_ROWS) + 2 * KV_B) + MOE * (SHARED + 2 * SHARED_ROWS)
             + DENSE + 2 * DENSE_ROWS + HEAD + 2 * VOCAB + 2 * NORMS + ROUTER_BF16)
# the GPU side on the CPU ('bf16w'): linear weights (kv_b_proj's per-head views included) and the router's
# in bf16 as stored, math in fp32, so only the norms and the router's bias are held in fp32
BF16W_SIDE = 2 * (LAYERS * ATTN + MOE * SHARED + DENSE + HEAD) + 4 * NORMS + ROUTER_BF16
EMBED = VOCAB * D * 2


def test_hand_sizes_match_the_design_figures(k2):
    assert EXPERT / 1e6 == pytest.approx(24.8, abs=0.05)
    assert MOE * E * EXPERT / GB == pytest.approx(571, abs=0.5)
    assert K * MOE * EXPERT / GB == pytest.approx(11.9, abs=0.05)
    side_params = LAYERS * ATTN + MOE * SHARED + DENSE + NORMS + HEAD + MOE * (E * D + E)
    assert (side_params + EMBED / 2) / 1e9 == pytest.approx(11.7, abs=0.1)  # "~11.5 B" non-expert params
    # the plan's per-token figure is size_report's
    assert plan(k2, Hardware.hypothetical(768, [48])).expert_bytes_per_token == size_report(k2).expert_bytes_per_token


def short_gb(e: PlanError) -> float:
    return float(re.search(r"short by ([\d.]+) GB", str(e)).group(1))


# ---- 24 GB GPU + 128 GB RAM ----------------------------------------------------------------
def test_24gb_gpu_128gb_ram_bf16_fits_at_8k_with_a_slot_cache(k2):
    hw = Hardware.hypothetical(128, [24], cores=16)
    p = plan(k2, hw)
    kv = (8192 + 64) * LAYERS * 576 * 2  # the context's pages and one for copy-on-write
    budget = 24 * GB - GPU_RESERVE
    # bf16 GPU side is 21.1 GB; with the 8K KV cache (0.58 GB) it fits 22.5 GB with 0.83 GB left,
    # less than one hot expert per layer (60 x 24.8 MB = 1.49 GB)
    assert BF16_SIDE + kv <= budget < BF16_SIDE + kv + MOE * EXPERT
    assert (p.device, p.gpu_precision, p.hot_experts_per_layer) == ("cuda", "bf16", 0)
    assert p.entry("kv_cache").nbytes == kv == (p.context + placement.COW_TOKENS) * KV_VALUES * 2
    assert p.entry("attention").nbytes == 2 * LAYERS * ATTN
    assert p.gpu_bytes == BF16_SIDE + kv
    # 571 GB of experts do not fit 128 GB: a cache of slots in what the embedding and reserve leave
    expert_budget = 128 * GB - EMBED - ram_reserve(128 * GB)
    assert p.expert_mode == "cache"
    assert p.cache_slots == expert_budget // SLOT == 4887
    assert p.slots_per_layer == pytest.approx(81.45, abs=0.01)  # 21% of each layer's 384 experts
    assert p.entry("routed_experts").nbytes == p.cache_slots * SLOT
    assert p.entry("embedding").where == "ram" and p.entry("embedding").nbytes == EMBED
    assert p.cpu_threads == 16


def test_24gb_gpu_long_context_switches_to_int8_with_hot_experts(k2):
    hw = Hardware.hypothetical(128, [24], cores=16)
    longest_bf16 = (24 * GB - GPU_RESERVE - BF16_SIDE) // (KV_VALUES * 2)
    assert 19_000 < longest_bf16 < 21_000
    p = plan(k2, hw, context=32768)
    kv = (32768 + 64) * LAYERS * 576 * 2
    assert p.gpu_precision == "int8"
    assert [p.entry(w).precision for w in ("attention", "shared_experts", "dense_mlp", "lm_head", "router", "norms")] \
        == ["int8"] * 4 + ["bf16"] * 2
    assert p.gpu_bytes - p.entry("hot_experts").nbytes == INT8_SIDE + kv
    assert p.hot_experts_per_layer == (24 * GB - GPU_RESERVE - INT8_SIDE - kv) // (MOE * EXPERT) == 6
    assert p.gpu_bytes <= 24 * GB - GPU_RESERVE


def test_forced_bf16_at_32k_keeps_what_fits_on_the_gpu_and_spills_the_rest(k2):
    """bf16 weights asked for: the KV pool takes the VRAM they leave (whole pages), and the rest of the
    context's positions are planned as the host tier in RAM, counted there."""
    hw = Hardware.hypothetical(128, [24], cores=16)
    p = plan(k2, hw, context=32768, gpu_precision="bf16")
    pool = (24 * GB - GPU_RESERVE - BF16_SIDE) // (KV_VALUES * 2) // 64 * 64
    assert (p.gpu_precision, p.kv_pool_tokens, p.hot_experts_per_layer) == ("bf16", pool, 0)
    assert 8192 <= pool < 32768 and p.kv_spill_tokens == 32768 - pool + 64  # and a page for copy-on-write
    assert p.entry("kv_cache").where == "gpu" and p.entry("kv_cache").nbytes == pool * KV_VALUES * 2
    assert p.entry("kv_spill").where == "ram" and p.entry("kv_spill").nbytes == p.kv_spill_tokens * KV_VALUES * 2
    assert p.gpu_bytes <= 24 * GB - GPU_RESERVE


def test_forced_bf16_is_refused_where_not_even_the_smallest_pool_fits(k2):
    hw = Hardware.hypothetical(128, [22], cores=16)
    with pytest.raises(PlanError) as ei:
        plan(k2, hw, context=32768, gpu_precision="bf16")
    short = BF16_SIDE + placement.MIN_POOL_TOKENS * KV_VALUES * 2 - (22 * GB - GPU_RESERVE)
    e = ei.value
    assert e.budget == "VRAM" and e.short_bytes == short
    assert short_gb(e) == pytest.approx(short / GB, abs=0.01)
    assert "--gpu-precision int8" in str(e) and "host RAM" in str(e)


def test_full_256k_context_on_a_24gb_gpu_spills_to_host_ram(k2):
    """K2's whole window on a 24 GB GPU with 128 GB of RAM: int8 weights, the VRAM they leave as KV
    pages, the rest of the 262,144 positions as host-tier pages (18.9 GB of bf16 latent in all)."""
    hw = Hardware.hypothetical(128, [24], cores=16)
    p = plan(k2, hw, context=262144)
    pool = (24 * GB - GPU_RESERVE - INT8_SIDE) // (KV_VALUES * 2) // 64 * 64
    assert (p.gpu_precision, p.kv_pool_tokens, p.kv_spill_tokens) == ("int8", pool, 262144 - pool + 64)
    assert 150_000 < pool < 262144
    assert p.entry("kv_spill").nbytes == (262144 - pool + 64) * KV_VALUES * 2
    assert p.ram_bytes >= p.entry("kv_spill").nbytes and p.gpu_bytes <= 24 * GB - GPU_RESERVE
    d = projected_decode_tps(p, k2, mem_read_gbps=80, disk_gbps=7, gpu_gbps=1000)
    assert any("over PCIe" in line for line in d["explain"])


# ---- CPU-only ------------------------------------------------------------------------------
def test_cpu_only_24gb_is_refused_for_k2(k2):
    hw = Hardware.hypothetical(24, cores=2)
    with pytest.raises(PlanError) as ei:
        plan(k2, hw)
    need = BF16W_SIDE + EMBED + 8256 * KV_VALUES * 2 + 2 * K * SLOT + ram_reserve(24 * GB)
    e = ei.value
    assert e.budget == "RAM" and e.short_bytes == need - 24 * GB
    assert short_gb(e) == pytest.approx((need - 24 * GB) / GB, abs=0.01)
    assert BF16W_SIDE / GB == pytest.approx(21.1, abs=0.1)  # 42.2 GB had they been widened to fp32
    assert "without a CUDA GPU" in str(e) and "more RAM" in str(e)


def test_cpu_only_768gb_holds_bf16_weights_and_mmaps_experts(k2):
    p = plan(k2, Hardware.hypothetical(768, cores=32))
    kv = 8256 * KV_VALUES * 2  # bf16 pages on the CPU too (widened inside the attention); a page for copy-on-write
    assert (p.device, p.gpu_precision, p.expert_mode, p.gpu_index) == ("cpu", "bf16w", "mmap", None)
    assert {e.where for e in p.entries} == {"ram", "mmap"} and p.gpu_bytes == 0
    assert p.entry("kv_cache").precision == "bf16" and p.entry("kv_cache").nbytes == kv
    assert p.entry("norms").nbytes == 4 * NORMS and p.entry("router").nbytes == ROUTER_BF16
    assert p.ram_bytes == BF16W_SIDE + kv + EMBED + MOE * E * EXPERT
    d = projected_decode_tps(p, k2, mem_read_gbps=80)
    read = 8192 * KV_VALUES * 2  # a token at full context reads the context's pages, not the spare one
    assert d["tok_s"] == pytest.approx(80 * GB / (K * MOE * EXPERT + BF16W_SIDE + read), rel=1e-6)


def test_cpu_only_512gb_caches(k2):
    p = plan(k2, Hardware.hypothetical(512, cores=32))
    budget = 512 * GB - BF16W_SIDE - EMBED - 8256 * KV_VALUES * 2 - ram_reserve(512 * GB)
    assert p.expert_mode == "cache" and p.cache_slots == budget // SLOT


def test_precision_options_on_a_cpu(k2):
    """Without a GPU, bf16 storage with fp32 math is the default ('bf16w'); int8 may be asked for
    ('int8w': the int8-eligible weights as on CUDA, kv_b_proj in bf16 as stored, the norms in fp32 since
    the math is fp32); a 'bf16' that would mean bf16 math on CUDA's terms is refused."""
    with pytest.raises(ValueError, match="gpu_precision 'bf16' needs a CUDA GPU"):
        plan(k2, Hardware.hypothetical(768), gpu_precision="bf16")
    p = plan(k2, Hardware.hypothetical(768), gpu_precision="int8")
    int8w_side = INT8_SIDE + 2 * NORMS
    assert p.gpu_precision == "int8w" and sum(e.nbytes for e in p.entries if e.what in GPU_SIDE) == int8w_side
    assert int8w_side / GB == pytest.approx(11.23, abs=0.01)  # 21.1 GB as bf16w
    assert p.entry("router").precision == "bf16w" and p.entry("attention").precision == "int8w"
    with pytest.raises(ValueError, match="computes in fp32"):
        plan(k2, Hardware.hypothetical(768), gpu_precision="int8", dtype="bfloat16")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        plan(k2, Hardware.hypothetical(768), device="cuda")
    assert plan(k2, Hardware.hypothetical(768, [48]), device="cpu").device == "cpu"


# ---- other refusals ------------------------------------------------------------------------
def test_tiny_ram_refused(k2):
    with pytest.raises(PlanError) as ei:
        plan(k2, Hardware.hypothetical(4, [24]))
    short = EMBED + ram_reserve(4 * GB) + 2 * K * SLOT - 4 * GB
    assert ei.value.budget == "RAM" and ei.value.short_bytes == short
    assert short_gb(ei.value) == pytest.approx(short / GB, abs=0.01)


def test_ram_budget_option(k2):
    hw = Hardware.hypothetical(128, [24])
    p = plan(k2, hw, ram_budget=50)
    assert p.cache_slots == 50 * GB // SLOT and p.ram_budget == 50 * GB
    with pytest.raises(PlanError, match=r"RAM is short by .* --ram-budget 121\.0 or less"):
        plan(k2, hw, ram_budget=127)
    # the suggestion is the limit: what it names fits, and past it the reserve is counted too
    assert plan(k2, hw, ram_budget=121.0).ram_budget == int(121.0 * GB)
    with pytest.raises(PlanError, match=r"kept free exceeds .* --ram-budget 121\.0 or less") as ei:
        plan(k2, hw, ram_budget=121.1)  # below the RAM there, above it less its reserve
    assert ei.value.short_bytes == EMBED + int(121.1 * GB) + ram_reserve(128 * GB) - 128 * GB
    with pytest.raises(PlanError, match="free some RAM") as ei:  # no budget to suggest that the next check refuses
        plan(k2, Hardware.hypothetical(4.845, [24]), ram_budget=5)
    assert "--ram-budget 0.3" not in str(ei.value)
    with pytest.raises(PlanError, match=r"RAM is short by 0\.30 GB.*--ram-budget 0\.4 or more"):
        plan(k2, hw, ram_budget=0.1)
    with pytest.raises(PlanError) as ei:
        plan(k2, hw, expert_mode="mmap")
    assert ei.value.short_bytes == MOE * E * EXPERT - (128 * GB - EMBED - ram_reserve(128 * GB))
    assert "--expert-mode cache" in str(ei.value)


def test_disk_short_for_a_missing_checkpoint(k2, tmp_path):
    hw = Hardware.hypothetical(768, [48], disk_free_gb=100)
    total = BF16_SIDE - ROUTER_BF16 + MOE * (E * D * 2 + E * 4) + EMBED + MOE * E * EXPERT
    with pytest.raises(PlanError) as ei:
        plan(k2, hw, checkpoint_dir=tmp_path)
    assert ei.value.budget == "disk" and ei.value.short_bytes == total - 100 * GB
    assert total / GB == pytest.approx(594.2, abs=0.1)
    p = plan(k2, Hardware.hypothetical(768, [48], disk_free_gb=700), checkpoint_dir=tmp_path)
    assert p.disk.free_bytes == 700 * GB


def test_bad_options(k2):
    hw = Hardware.hypothetical(128, [24])
    for kw in (dict(context=0), dict(context=262145), dict(gpu_precision="fp8"), dict(expert_mode="ssd"),
               dict(cpu_threads=0), dict(hot_experts=-1)):
        with pytest.raises(ValueError):
            plan(k2, hw, **kw)


# ---- projections, rows, and the tiny model ---------------------------------------------------
def test_projection_in_cache_mode(k2):
    p = plan(k2, Hardware.hypothetical(128, [24], cores=16))
    with pytest.raises(ValueError, match="disk_gbps"):
        projected_decode_tps(p, k2, mem_read_gbps=80)
    per_token = K * MOE * EXPERT
    d = projected_decode_tps(p, k2, mem_read_gbps=80, disk_gbps=7)
    assert d["hit_rate"] == pytest.approx(4887 / 23040)  # i.i.d. routing: the cache's share of experts
    assert d["disk_s"] == pytest.approx(per_token * (1 - 4887 / 23040) / (7 * GB), rel=1e-6)
    assert d["bottleneck"] == "disk" and d["tok_s"] == pytest.approx(0.75, abs=0.01)
    d = projected_decode_tps(p, k2, mem_read_gbps=80, disk_gbps=7, hit_rate=0.9)
    assert d["tok_s"] == pytest.approx(7 * GB / (per_token * 0.1), rel=1e-6)
    assert any("hit rate 90%" in line for line in d["explain"])


def test_rows_and_frozen(k2):
    p = plan(k2, Hardware.hypothetical(768, [48]))
    rows = p.rows()
    assert len(rows) == 10 and all(len(r) == 4 for r in rows)
    assert {r[1] for r in rows} == {"gpu", "ram", "mmap"}
    assert sum(r[3] for r in rows) == pytest.approx((p.gpu_bytes + p.ram_bytes) / GB)
    assert any(r[0].startswith("hot experts (16/layer") and r[2] == "int4" for r in rows)
    assert "mmap" in p.summary()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.context = 1


def test_tiny_config_cpu_only_on_this_machine_is_mmap():
    cfg = ModelConfig.from_dict(preset_config("tiny"))
    p = plan(cfg, detect(), context=512)
    assert p.expert_mode == "mmap" and p.cache_slots == 0
    assert p.entry("kv_cache").nbytes == 576 * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    # every tensor of the checkpoint is accounted for exactly once (bf16 GPU plan adds them up to the disk bytes)
    g = plan(cfg, Hardware.hypothetical(64, [8]), context=1, hot_experts=0)
    on_disk = sum(e.nbytes for e in g.entries if e.what not in ("kv_cache", "hot_experts"))
    assert on_disk == size_report(cfg).disk_bytes


def test_this_machine_refuses_k2_cpu_only(k2):
    hw = detect()
    if hw.gpus or hw.ram_available > 60 * GB:
        pytest.skip("this machine could hold the fp32 GPU side")
    with pytest.raises(PlanError, match="RAM is short by"):
        plan(k2, hw)


# ---- the default context: chosen from the plan (hybrid.runtime.context) ------------------------------
CANDIDATES = (131072, 65536, 32768, 16384, 8192, 4096)


def expected_context(p: placement.Plan, window: int, weights: int = 0) -> int:
    """The rule, recomputed from the plan's own numbers: the longest candidate within the model's window whose
    pages (context + the copy-on-write page) take <= 10% of the memory they live in and, on CUDA, leave room for
    the GPU side's weights (`weights`) in the VRAM budget; at least 4096 (or the window)."""
    memory = p.gpu_budget if p.device == "cuda" else p.ram_available
    ok = [c for c in CANDIDATES if c <= window and (c + 64) * p.kv_bytes_per_token <= 0.10 * memory
          and (p.device != "cuda" or weights + (c + 64) * p.kv_bytes_per_token <= p.gpu_budget)]
    return max(ok, default=min(4096, window))


def test_default_context_on_a_24gb_gpu_with_128gb_ram(k2):
    """22.5 GB of VRAM budget: 10% holds 16K tokens of K2's KV pages (1.16 GB) but not 32K (2.31 GB); bf16 stays."""
    hw = Hardware.hypothetical(128, [24])
    p = placement.plan(k2, hw)
    weights = sum(p.entry(w).nbytes for w in GPU_SIDE)
    assert p.kv_bytes_per_token == KV_VALUES * 2 and p.gpu_budget == 24 * GB - GPU_RESERVE
    assert p.context == expected_context(p, k2.max_position_embeddings, weights) == 16384
    assert p.gpu_precision == "bf16" and weights == BF16_SIDE and p.entry("kv_cache").where == "gpu"
    assert p.entry("kv_cache").nbytes == (16384 + 64) * KV_VALUES * 2 and p.kv_spill_tokens == 0
    assert p.context_why.startswith("context 16,384 from the plan") and "32,768 would take 2.31 GB" in p.context_why


def test_default_context_keeps_bf16_weights_before_a_longer_context(k2):
    """A 24.7 GB GPU: 10% of its budget would hold 32K, but 32K's pages beside the bf16 weights do not fit, so the
    plan keeps bf16 and 16K (the precision first, then the context); 32K asked for gets int8."""
    hw = Hardware.hypothetical(128, [24.7])
    p = placement.plan(k2, hw)
    pages_32k = (32768 + 64) * KV_VALUES * 2
    assert pages_32k <= 0.10 * p.gpu_budget and BF16_SIDE + pages_32k > p.gpu_budget
    assert (p.context, p.gpu_precision) == (expected_context(p, k2.max_position_embeddings, BF16_SIDE), "bf16")
    assert p.context == 16384 and "32,768 would not leave room for bf16 GPU-side weights" in p.context_why
    assert placement.plan(k2, hw, context=32768).gpu_precision == "int8"


def test_default_context_on_a_768gb_cpu_only_machine(k2):
    """No GPU: 10% of 768 GB of RAM holds the longest candidate (131,072 tokens: 9.22 GB); the experts stay mmap'd."""
    p = placement.plan(k2, Hardware.hypothetical(768))
    assert p.context == expected_context(p, k2.max_position_embeddings) == 131072
    assert p.entry("kv_cache").nbytes == (131072 + 64) * KV_VALUES * 2 and p.expert_mode == "mmap"
    assert "the longest default" in p.context_why


def test_default_context_for_tiny_on_this_machine():
    cfg = ModelConfig.from_dict(preset_config("tiny"))
    p = placement.plan(cfg, detect())
    assert p.context == expected_context(p, cfg.max_position_embeddings, sum(
        p.entry(w).nbytes for w in GPU_SIDE))
    assert p.kv_pool_tokens >= p.context + 64 and p.entry("kv_cache").nbytes == p.kv_pool_tokens * p.kv_bytes_per_token


def test_an_explicit_context_is_kept(k2):
    for hw in (Hardware.hypothetical(128, [24]), Hardware.hypothetical(768)):
        for context in (16, 4096, 8192, 262144):
            p = placement.plan(k2, hw, context=context)
            assert (p.context, p.context_why) == (context, f"context {context:,} as given (--context)")
    small = ModelConfig.from_dict(dict(preset_config("tiny"), max_position_embeddings=2048))
    assert placement.plan(small, detect()).context == 2048  # the model's window, below the 4096 floor
    assert placement.plan(small, detect(), context=100).context == 100


@pytest.mark.parametrize("ram_gb", [24, 27.5, 28, 32, 607, 610, 615, 650])  # 27.5-28, 610-615: the room binds
def test_the_default_never_costs_what_4096_had(k2, ram_gb):
    """On a CPU the default's pages also leave the RAM side what 4096 gave it: a plan that fits at 4096 fits, and
    routed experts resident at 4096 stay resident (a longer context shrinks only the slot cache)."""
    hw = Hardware.hypothetical(ram_gb)
    try:
        short = placement.plan(k2, hw, context=4096)
    except PlanError:
        return
    p = placement.plan(k2, hw)
    assert p.context >= 4096 and p.expert_mode == short.expert_mode
    assert (p.context + 64) * p.kv_bytes_per_token <= 0.10 * p.ram_available
