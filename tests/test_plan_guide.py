"""`kimi-hybrid plan` as a buying guide, on the real K2 Thinking config: a hypothetical machine is never
measured on this box (its figures are given or typical, each labelled), the "what would help" figures are
recomputed here from the plans' own numbers, two GPUs are planned on the first with the second's worth
said, an automatic int8 is announced, and CPU-only plans show no GPU rows. GB = 1e9 bytes."""
from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from hybrid.checkpoint.config import ModelConfig
from hybrid.cli.common import console
from hybrid.cli.plan import plan as plan_cmd
from hybrid.cluster.projection import project_cluster
from hybrid.runtime import probe
from hybrid.runtime.hardware import Hardware, typical_mem_gbps
from hybrid.runtime.placement import GPU_RESERVE, GPU_SIDE, Plan, PlanError, plan

from tests.conftest import REAL_CONFIG

GB = 10**9


@pytest.fixture(scope="module")
def k2() -> ModelConfig:
    return ModelConfig.from_file(REAL_CONFIG)


@pytest.fixture(autouse=True)
def nothing_measured_here(monkeypatch):
    """Every probe of this box fails the test, unless a test puts a figure back."""
    def measured(*a, **k):
        raise AssertionError("plan measured this machine")
    for name in ("mem_read_gbps", "disk_read_gbps", "gpu_read_gbps"):
        monkeypatch.setattr(probe, name, measured)
    # one line per sentence, whatever the terminal; the field behind rich's width setter, so that undoing
    # the patch restores "follow the terminal" (None) rather than freezing the width read now
    monkeypatch.setattr(console, "_width", 250)


def run(*args: str) -> dict:
    r = CliRunner().invoke(plan_cmd, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def text(*args: str) -> str:
    r = CliRunner().invoke(plan_cmd, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def ceiling(p: Plan, mem: float, disk: float | None = None, gpu: float | None = None, hit: float | None = None) -> float:
    """Batch-1 ceiling by hand from the plan's numbers: bytes per token over bandwidth, the slowest stage."""
    routed = p.experts_per_token * p.n_moe_layers * p.expert_bytes
    on_cpu = routed * (1 - p.hot_experts_per_layer / p.experts_per_layer)
    # a token reads the KV pages of a conversation of min(context, 8192) tokens (not the pool's spare ones)
    side = sum(e.nbytes for e in p.entries if e.what in GPU_SIDE) + min(p.context, 8192) * p.kv_bytes_per_token
    if hit is None:
        hit = 1.0 if p.expert_mode == "mmap" else min(1.0, p.cache_slots / (p.n_moe_layers * p.experts_per_layer))
    stages = [(1 - hit) * on_cpu / (disk * GB) if hit < 1 else 0.0]
    if p.device == "cpu":
        stages.append((on_cpu + side) / (mem * GB))
    else:
        stages.append(on_cpu / (mem * GB))
        if gpu:
            stages.append((side + routed - on_cpu) / (gpu * GB))
    return 1 / max(stages)


def helps(out: dict) -> dict[str, dict]:
    return {h["kind"]: h for h in out["what_would_help"]}


# ---- where the figures come from ----------------------------------------------------------------

def test_a_hypothetical_machine_uses_typical_figures_never_this_boxs():
    out = run("--ram-gb", "192", "--gpu-gb", "24")
    m = out["machine"]
    assert m["hypothetical"] and m["measured_here"] == []
    # 192 GB: a desktop's 2 channels of DDR5-4800, 75% of 2 x 8 bytes x 4800 MT/s; misses from an NVMe Gen4 drive
    assert m["mem_read_gbps"] == pytest.approx(2 * 8 * 4800e6 * 0.75 / GB) == typical_mem_gbps(2, "ddr5-4800")
    assert m["disk_read_gbps"] == 7.0 and m["gpu_read_gbps"] is None
    assert m["sources"] == {"mem_read_gbps": "typical: 2-channel DDR5-4800", "disk_read_gbps": "typical: nvme-gen4",
                            "gpu_read_gbps": "unknown: not counted; --gpu-gbps"}
    out = run("--ram-gb", "768", "--ram-type", "ddr4-3200", "--disk-gbps", "3", "--gpu-gb", "48", "--gpu-gbps", "900")
    assert out["machine"]["mem_read_gbps"] == pytest.approx(8 * 8 * 3.2 * 0.75)  # past 256 GB: 8 channels
    assert out["machine"]["sources"]["mem_read_gbps"] == "typical: 8-channel DDR4-3200"
    assert out["machine"]["sources"]["gpu_read_gbps"] == "given"
    out = run("--ram-gb", "192", "--gpu-gb", "24", "--ram-channels", "4", "--disk-type", "nvme-gen5")
    assert out["machine"]["mem_read_gbps"] == pytest.approx(typical_mem_gbps(4, "ddr5-4800"))
    assert out["machine"]["disk_read_gbps"] == 12.0
    assert "this machine's size" in text("--gpu-gb", "24", "-m", "tiny")  # the one figure taken from here, said
    shown = text("--ram-gb", "192", "--gpu-gb", "24")
    assert "this machine's size" not in shown
    assert "57.6 GB/s (typical: 2-channel DDR5-4800)" in shown and "7 GB/s (typical: nvme-gen4)" in shown
    assert "typical figures are for the hardware described" in shown and "measured" not in shown


def test_this_machine_is_measured_and_says_so(monkeypatch):
    monkeypatch.setattr(probe, "mem_read_gbps", lambda threads=None: 9.31234)
    out = run("-m", "tiny")
    assert not out["machine"]["hypothetical"] and out["machine"]["measured_here"] == ["mem_read_gbps"]
    assert out["machine"]["sources"]["mem_read_gbps"] == "measured here"
    shown = text("-m", "tiny")
    assert "9.31 GB/s (measured here)" in shown and "9.31234" not in shown


def test_bandwidths_are_rounded_as_people_write_them():
    shown = text("--ram-gb", "192", "--gpu-gb", "24", "--mem-gbps", "57.6", "--disk-gbps", "1.55624", "--gpu-gbps", "1008")
    assert "1.56 GB/s (given)" in shown and "1,008 GB/s (given)" in shown and "1.55624" not in shown


# ---- what would help, three machines --------------------------------------------------------------

def test_help_for_a_24gb_gpu_and_192gb_of_ram(k2):
    """Experts spill to disk: more RAM until every one fits, a faster disk, int8 (hot experts), a second machine."""
    mem, disk, gpu = 100.0, 7.0, 1000.0
    out = run("--ram-gb", "192", "--gpu-gb", "24", "--mem-gbps", "100", "--disk-gbps", "7", "--gpu-gbps", "1000")
    p = plan(k2, Hardware.hypothetical(192, [24]))
    assert out["projection"]["tok_s"] == pytest.approx(ceiling(p, mem, disk, gpu), rel=1e-6)
    assert out["projection"]["bottleneck"] == "disk"
    h = helps(out)
    assert set(h) == {"ram", "disk", "int8", "nodes"}
    # the least whole GB of RAM that holds every expert: one GB less does not
    ram_gb = h["ram"]["ram_gb"]
    every = plan(k2, Hardware.hypothetical(ram_gb, [24]), expert_mode="mmap")
    with pytest.raises(PlanError):
        plan(k2, Hardware.hypothetical(ram_gb - 1, [24]), expert_mode="mmap")
    assert 580 < ram_gb < 600 and h["ram"]["tok_s"] == pytest.approx(ceiling(every, mem, None, gpu), rel=1e-6)
    assert h["disk"]["disk_gbps"] == 12.0 and h["disk"]["tok_s"] == pytest.approx(ceiling(p, mem, 12.0, gpu), rel=1e-6)
    int8 = plan(k2, Hardware.hypothetical(192, [24]), gpu_precision="int8")
    assert int8.hot_experts_per_layer > p.hot_experts_per_layer == 0
    assert h["int8"]["tok_s"] == pytest.approx(ceiling(int8, mem, disk, gpu), rel=1e-6)
    side_s = (sum(e.nbytes for e in p.entries if e.what in GPU_SIDE + ("kv_cache",))) / (gpu * GB)
    two = project_cluster(2, 60, 384, 8, 7168, p.expert_bytes, p.cache_slots, mem, disk, side_s, 1.25, 50.0)
    assert h["nodes"]["tok_s"] == pytest.approx(two["tok_s"], rel=1e-6)
    shown = text("--ram-gb", "192", "--gpu-gb", "24", "--mem-gbps", "100", "--disk-gbps", "7", "--gpu-gbps", "1000")
    assert f"{ram_gb:,} GB of RAM (+{ram_gb - 192}): every routed expert fits" in shown
    assert f"~{h['ram']['tok_s']:,.2f} tok/s" in shown and "outputs may differ slightly from bf16" in shown
    assert "--nodes 2" in shown


def test_help_for_a_48gb_gpu_and_768gb_of_ram(k2):
    """Every expert in RAM and RAM-bound: RAM bandwidth and a second machine help; more RAM or a disk cannot."""
    out = run("--ram-gb", "768", "--gpu-gb", "48", "--mem-gbps", "200", "--gpu-gbps", "1000")
    p = plan(k2, Hardware.hypothetical(768, [48]))
    assert out["projection"]["bottleneck"] == "ram"
    h = helps(out)
    assert "ram" not in h and "disk" not in h
    assert h["mem_bw"]["mem_gbps"] == 400 and h["mem_bw"]["tok_s"] == pytest.approx(ceiling(p, 400, None, 1000), rel=1e-6)
    int8 = plan(k2, Hardware.hypothetical(768, [48]), gpu_precision="int8")
    assert h["int8"]["tok_s"] == pytest.approx(ceiling(int8, 200, None, 1000), rel=1e-6)
    assert h["int8"]["tok_s"] > out["projection"]["tok_s"]
    assert h["nodes"]["tok_s"] > out["projection"]["tok_s"]


def test_help_for_a_cpu_only_512gb_machine(k2):
    """No GPU: the plan and its help speak of RAM and the CPU, never of a GPU side or a 0.0 ms GPU stage."""
    args = ("--ram-gb", "512", "--cores", "32", "--mem-gbps", "200", "--disk-gbps", "3.5")
    out = run(*args)
    p = plan(k2, Hardware.hypothetical(512, cores=32))
    assert out["plan"]["device"] == "cpu" and out["projection"]["tok_s"] == pytest.approx(ceiling(p, 200, 3.5), rel=1e-6)
    h = helps(out)
    every = plan(k2, Hardware.hypothetical(h["ram"]["ram_gb"], cores=32), expert_mode="mmap")
    assert h["ram"]["tok_s"] == pytest.approx(ceiling(every, 200), rel=1e-6)
    assert h["disk"]["disk_gbps"] == 7.0 and h["disk"]["tok_s"] == pytest.approx(ceiling(p, 200, 7.0), rel=1e-6)
    int8 = plan(k2, Hardware.hypothetical(512, cores=32), gpu_precision="int8")
    assert int8.gpu_precision == "int8w" and h["int8"]["tok_s"] == pytest.approx(ceiling(int8, 200, 3.5), rel=1e-6)
    shown = text(*args)
    for gone in ("GPU side", "GPU-side", "time per token: gpu", "hot experts on the GPU", "0.0 ms gpu"):
        assert gone not in shown, gone
    assert "int8 for the non-expert weights" in shown


# ---- two GPUs, automatic int8 ---------------------------------------------------------------------

def test_two_gpus_plan_on_the_first_and_say_what_the_second_adds(k2):
    one = run("--ram-gb", "768", "--gpu-gb", "24", "--mem-gbps", "200", "--gpu-gbps", "1000")
    two = run("--ram-gb", "768", "--gpu-gb", "24", "--gpu-gb", "24", "--mem-gbps", "200", "--gpu-gbps", "1000")
    assert two["plan"]["rows"] == one["plan"]["rows"] and two["projection"] == one["projection"]
    p = plan(k2, Hardware.hypothetical(768, [24]))
    extra = (24 * GB - GPU_RESERVE) // (p.n_moe_layers * p.expert_bytes)
    g = helps(two)["gpu"]
    assert g["gpu"] == 1 and g["hot_experts_per_layer"] == p.hot_experts_per_layer + extra
    from dataclasses import replace
    with_it = replace(p, hot_experts_per_layer=p.hot_experts_per_layer + extra)
    assert g["tok_s"] == pytest.approx(ceiling(with_it, 200, None, 1000), rel=1e-6)
    assert g["tok_s"] > one["projection"]["tok_s"]
    shown = text("--ram-gb", "768", "--gpu-gb", "24", "--gpu-gb", "24", "--mem-gbps", "200", "--gpu-gbps", "1000")
    assert f"GPU 1 (24 GB) stays idle: kimi-hybrid runs on GPU 0; as hot experts it would hold {extra} more" in shown


def test_automatic_int8_is_announced_with_what_it_changes(k2):
    out = run("--ram-gb", "768", "--gpu-gb", "24", "--mem-gbps", "200", "--context", "65536")
    note = out["plan"]["int8_note"]
    assert out["plan"]["gpu_precision"] == "int8" and "int8 chosen automatically" in note
    assert "Outputs may differ slightly from bf16" in note
    # the context it names keeps bf16 on the same GPU
    ctx = int(note.split("--context ")[1].split(" ")[0].replace(",", ""))
    assert plan(k2, Hardware.hypothetical(768, [24]), context=ctx, gpu_precision="bf16").gpu_precision == "bf16"
    assert "int8 chosen automatically" in text("--ram-gb", "768", "--gpu-gb", "24", "--mem-gbps", "200",
                                                "--context", "65536")
    asked = run("--ram-gb", "768", "--gpu-gb", "24", "--mem-gbps", "200", "--context", "65536", "--gpu-precision", "int8")
    assert asked["plan"]["int8_note"] is None
    assert run("--ram-gb", "768", "--gpu-gb", "24", "--mem-gbps", "200")["plan"]["int8_note"] is None
    assert math.isfinite(out["projection"]["ram_s"])


def test_a_ram_budget_that_spills_experts_is_named_as_the_fix():
    """Every expert fits this RAM but --ram-budget keeps them out: the help says so, not '+0 GB of RAM'."""
    out = run("--ram-gb", "768", "--gpu-gb", "24", "--ram-budget", "200", "--mem-gbps", "300", "--gpu-gbps", "1000")
    h = helps(out)["ram"]
    assert h["ram_gb"] == 768 and h["text"].startswith("every routed expert already fits this RAM")
    alone = run("--ram-gb", "768", "--gpu-gb", "24", "--mem-gbps", "300", "--gpu-gbps", "1000")
    assert h["tok_s"] == pytest.approx(alone["projection"]["tok_s"])
