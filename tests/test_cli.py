"""The kimi-hybrid command through click's CliRunner: generate, info, errors without tracebacks."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hybrid.checkpoint.reader import Checkpoint
from hybrid.cli.main import count, main, nbytes
from hybrid.cli.chat import validate_messages, validate_tools
from hybrid.cli.common import UserError
from hybrid.checkpoint.config import ModelConfig
from hybrid.checkpoint.layout import size_report

from tests.conftest import REAL_CONFIG


def test_generate_then_info(tmp_path):
    r = CliRunner().invoke(main, ["generate", "tiny", "--out", str(tmp_path / "t"), "--seed", "3"])
    assert r.exit_code == 0, r.output
    ck = Checkpoint(tmp_path / "t")
    assert len(ck.tensors) == 331
    r = CliRunner().invoke(main, ["info", "-m", str(tmp_path / "t"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["tensors"] == 331 and out["routed_experts"] == 16


def test_generate_is_deterministic_and_refuses_to_overwrite(tmp_path):
    runner = CliRunner()
    for d in ("a", "b"):
        assert runner.invoke(main, ["generate", "tiny", "--out", str(tmp_path / d)]).exit_code == 0
    for f in (tmp_path / "a").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    r = runner.invoke(main, ["generate", "tiny", "--out", str(tmp_path / "a")])
    assert r.exit_code == 1 and "not empty" in r.output and "Traceback" not in r.output


def test_info_on_the_real_config():
    r = CliRunner().invoke(main, ["info", "-m", str(REAL_CONFIG), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert round(out["total_params"] / 1e12, 2) == 1.03 and round(out["disk_bytes"] / 1e9) == 594


def test_bad_path_is_one_clear_line(tmp_path):
    r = CliRunner().invoke(main, ["info", "-m", str(tmp_path / "nope")])
    assert r.exit_code == 1
    assert "no such checkpoint directory" in r.output and "Traceback" not in r.output
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    r = CliRunner().invoke(main, ["info", "-m", str(tmp_path / "broken")])
    assert r.exit_code == 1 and "missing required field" in r.output


def test_run_answers_a_prompt(tiny_path):
    r = CliRunner().invoke(main, ["run", "hello", "-m", str(tiny_path), "--max-tokens", "5", "--temperature", "0"])
    assert r.exit_code == 0, r.output
    assert "prompt" in r.output and (("[cut at --max-tokens]" in r.output and "5 generated" in r.output)
                                     or "[finished]" in r.output)


@pytest.mark.parametrize("args, option", [
    (["run", "hi", "--ram-budget", "inf"], "--ram-budget"),
    (["run", "hi", "--ram-budget", "nan"], "--ram-budget"),
    (["run", "hi", "--ram-budget", "-5"], "--ram-budget"),
    (["run", "hi", "--ram-budget", "0"], "--ram-budget"),
    (["run", "hi", "--gpu-memory", "nan"], "--gpu-memory"),
    (["run", "hi", "--temperature", "inf"], "--temperature"),
    (["run", "hi", "--seed", str(2**64)], "--seed"),
    (["run", "hi", "--cpu-threads", "100000"], "--cpu-threads"),
    (["chat", "--top-p", "nan"], "--top-p"),
    (["chat", "--min-p", "nan"], "--min-p"),
    (["bench", "--gpu-memory", "inf"], "--gpu-memory"),
    (["bench", "--probe-mb", "1000000"], "--probe-mb"),
    (["serve", "--ram-budget", "nan"], "--ram-budget"),
    (["serve", "--keepalive", "0"], "--keepalive"),
    (["bench", "--runs", "99999999999999999999"], "--runs"),
    (["plan", "--ram-gb", "1e-10"], "--ram-gb"),
    (["plan", "--mem-gbps", "1e308"], "--mem-gbps"),
    (["run", "hi", "--ram-budget", "1e308"], "--ram-budget"),
    (["plan", "--ram-gb", "nan"], "--ram-gb"),
    (["plan", "--ram-gb", "1e400"], "--ram-gb"),
    (["plan", "--gpu-gb", "24", "--gpu-gb", "inf"], "--gpu-gb"),
    (["plan", "--ram-budget", "nan"], "--ram-budget"),
    (["plan", "--mem-gbps", "-1"], "--mem-gbps"),
    (["plan", "--hit-rate", "nan"], "--hit-rate"),
    (["generate", "tiny", "--seed", "-1"], "--seed"),
])
def test_bad_numbers_name_the_option(args, option):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.output and "Traceback" not in r.output, r.output


def test_plan_refuses_budgets_that_are_not_positive_finite_numbers():
    import math

    from hybrid.runtime.hardware import Hardware
    from hybrid.runtime.placement import plan

    cfg, hw = ModelConfig.from_file(REAL_CONFIG), Hardware.hypothetical(768, (24,))
    for bad in (math.inf, math.nan, -5, 0, "12", True):
        for option, kw in (("--ram-budget", "ram_budget"), ("--gpu-memory", "gpu_memory")):
            with pytest.raises(ValueError, match=f"{option} must be a finite number of GB above 0, got"):
                plan(cfg, hw, **{kw: bad})


def test_kernel_bench_refuses_the_model_options_it_would_ignore():
    r = CliRunner().invoke(main, ["bench", "--kernels", "--small", "-m", "tiny", "--runs", "1"])
    assert r.exit_code == 1 and "--model, --runs do not apply; leave them out" in r.output, r.output
    r = CliRunner().invoke(main, ["bench", "--kernels", "--small", "--cpu-threads", "1"])
    assert r.exit_code == 1 and "--cpu-threads does not apply; leave it out" in r.output, r.output


def test_kernel_bench_threads_past_numba_name_the_option():
    import numba

    n = numba.config.NUMBA_NUM_THREADS
    r = CliRunner().invoke(main, ["bench", "--kernels", "--small", "--threads", str(n + 1)])
    assert r.exit_code == 1 and f"--threads {n + 1} is more than the {n} threads" in r.output
    assert f"use --threads {n} or less" in r.output and "Traceback" not in r.output


def test_a_probe_buffer_past_the_free_ram_names_the_option(tiny_path, monkeypatch):
    import psutil

    from hybrid.bench import engine_bench as bench

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 1 << 30})())  # 1 GB free
    r = CliRunner().invoke(main, ["bench", "-m", str(tiny_path), "--probe-mb", "1024"])
    assert r.exit_code == 1 and "--probe-mb 1024 asks for a 1,024 MB buffer but only 1,024 MB" in r.output
    assert "use --probe-mb 256" in r.output and "Traceback" not in r.output
    monkeypatch.undo()

    def no_memory(nbytes):
        raise MemoryError()

    monkeypatch.setattr(bench, "probe_buffer", no_memory)  # the allocation fails all the same
    r = CliRunner().invoke(main, ["bench", "-m", str(tiny_path), "--probe-mb", "16", "--prompt-tokens", "4",
                                  "--gen-tokens", "2", "--runs", "1"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "out of memory: the RAM bandwidth probe could not allocate its 16 MB buffer; use a smaller --probe-mb" \
        in r.output and r.output.count("--probe-mb") == 1  # the advice once, not repeated by the CLI


@pytest.mark.parametrize("error, says", [(MemoryError(), "out of memory (an allocation failed)"),
                                         (OverflowError("int too large to convert"), "a number is out of range")])
def test_memory_and_overflow_errors_are_one_line(monkeypatch, error, says):
    import hybrid.bench.kernel_bench as kb

    def fail(small, threads):
        raise error

    monkeypatch.setattr(kb, "run_kernel_bench", fail)
    r = CliRunner().invoke(main, ["bench", "--kernels", "--small"])
    assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["--debug", "bench", "--kernels", "--small"])
    assert r.exception is error  # --debug shows the traceback


def test_info_sizes_in_units_that_fit(tiny_path):
    r = CliRunner().invoke(main, ["info", "-m", str(tiny_path)])
    assert r.exit_code == 0, r.output
    rep = size_report(Checkpoint(tiny_path).config)
    assert rep.total_params < 1e7 and rep.disk_bytes < 1e7  # tiny: a few million parameters and bytes
    assert f"{count(rep.total_params)} total, {count(rep.active_params)} active" in r.output
    assert f"{nbytes(rep.disk_bytes)} ({nbytes(rep.routed_expert_bytes)} routed experts" in r.output
    assert "0.0 B" not in r.output and "0.0 GB" not in r.output
    assert [count(n) for n in (412, 935_488, 2_113_536, 32.86e9, 1.0266e12)] == \
        ["412", "935 K", "2.11 M", "32.9 B", "1.03 T"]
    assert [nbytes(n) for n in (512, 1_970_000, 594.3e9, 11.9e9, 104e12)] == \
        ["512 B", "1.97 MB", "594 GB", "11.9 GB", "104 TB"]


# ---- --model resolution -------------------------------------------------------------------------

def test_model_from_the_hf_cache_and_the_fetch_command_when_missing(tiny_path, tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--someorg--Tiny-K2" / "snapshots" / "0123abc"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(tiny_path, target_is_directory=True)  # HF snapshots are links into blobs
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    r = CliRunner().invoke(main, ["info", "-m", "someorg/Tiny-K2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["tensors"] == 331
    r = CliRunner().invoke(main, ["run", "hi", "-m", "moonshotai/Kimi-K2-Thinking"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "not in the Hugging Face cache" in r.output and "hf download moonshotai/Kimi-K2-Thinking" in r.output


def test_preset_generated_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("KIMI_HYBRID_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(main, ["info", "-m", "tiny", "--json"])
    assert r.exit_code == 0, r.output
    assert "generating the built-in 'tiny' checkpoint" in r.output
    r = CliRunner().invoke(main, ["info", "-m", "tiny", "--json"])  # the second time it is there
    assert r.exit_code == 0 and "generating" not in r.output


def test_model_mistakes_are_one_line(tmp_path):
    (tmp_path / "f.json").write_text("{}")
    for args, says in ((["run", "hi", "-m", str(tmp_path / "f.json")], "is a file"),
                       (["run", "hi", "-m", "no-such-thing"], "no such checkpoint directory"),
                       (["chat", "-m", str(tmp_path / "nope")], "no such checkpoint directory")):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1


# ---- bench ----------------------------------------------------------------------------------------

SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "bench_schema.md"
TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array of number": list}


def documented_fields() -> dict[str, tuple[str, bool]]:
    """field path -> (type, nullable) from the table in docs/bench_schema.md."""
    out = {}
    for line in SCHEMA_DOC.read_text().splitlines():
        m = re.match(r"\| `([\w.*]+)` \| ([a-z ]+?) \|", line)
        if m:
            typ, nullable = m.group(2).removesuffix(" or null"), m.group(2).endswith(" or null")
            assert typ in TYPES, f"unknown type {typ!r} in the schema doc"
            out[m.group(1)] = (typ, nullable)
    return out


def check_schema(out: dict) -> None:
    fields = documented_fields()
    seen, null = set(), set()

    def walk(obj: dict, prefix: str) -> None:
        for k, v in obj.items():
            path = prefix + k
            if path not in fields:  # a documented family: `a.b.*.c` stands for every listed `a.b.X`'s `c`
                path = ".".join(prefix.split(".")[:-2] + ["*", k]) if prefix.count(".") >= 2 else path
            assert path in fields, f"{prefix + k} is in the output but not in docs/bench_schema.md"
            seen.add(path)
            typ, nullable = fields[path]
            if v is None:
                null.add(path)
                assert nullable, f"{path} is null but not documented as nullable"
                continue
            assert isinstance(v, TYPES[typ]) and not (typ != "boolean" and isinstance(v, bool)), f"{path}: {v!r}"
            if typ == "array of number":
                assert all(isinstance(x, (int, float)) for x in v)
            if typ == "object":
                walk(v, path + ".")

    walk(out, "")
    missing = {p for p in set(fields) - seen if not any(p.startswith(q + ".") for q in null)}
    assert not missing, f"documented but missing from the output: {missing}"


def test_bench_json_follows_the_documented_schema(tiny_path):
    args = ["bench", "-m", str(tiny_path), "--prompt-tokens", "8", "--gen-tokens", "4", "--runs", "2", "--probe-mb", "16"]
    r = CliRunner().invoke(main, args + ["--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    check_schema(out)
    assert out["schema"] == "kimi-hybrid.bench/2" and out["settings"]["runs"] == 2
    probes = out["machine"]["mem_read_gbps_probes"]  # one before the runs, one after each; the best counts
    assert len(probes) == 3 and out["machine"]["mem_read_gbps"] == max(probes) > 0
    assert len(out["decode"]["runs_tok_s"]) == 2 and out["decode"]["tok_s"]["min"] <= out["decode"]["tok_s"]["max"]
    d = out["decode"]
    assert d["bytes_per_token"] == d["expert_bytes_per_token"] + d["weight_bytes_per_token"] > 0
    assert abs(d["achieved_gbps"] - d["bytes_per_token"] * d["tok_s"]["median"] / 1e9) < 1e-9
    paired = [100 * d["bytes_per_token"] * t / 1e9 / ((probes[i] + probes[i + 1]) / 2)
              for i, t in enumerate(d["runs_tok_s"])]  # each run against the probes before and after it
    assert d["pct_of_mem_read_paired"] == pytest.approx(sum(paired) / 2, rel=1e-9)  # the median of two runs
    # each token's own time: the 3 gaps after the first of each run's 4 tokens add up to the run's decode time
    tm = d["token_ms"]
    assert tm["median"] <= tm["p90"] <= tm["max"] and tm["mean"] <= tm["max"]
    assert tm["mean"] * 6 == pytest.approx(1e3 * sum(3 / x for x in d["runs_tok_s"]), rel=1e-9)
    assert d["pct_of_mem_read_median_token"] == pytest.approx(
        100 * d["bytes_per_token"] / (tm["median"] / 1e3) / 1e9 / out["machine"]["mem_read_gbps"], rel=1e-9)
    st = d["host_steal"]  # Linux reports steal (0 outside a VM): every decoded token is counted
    assert st is not None and st["tokens"] == 6 and 0 <= st["tokens_hit"] <= 6 and st["ms_per_token"] >= 0
    if st["tokens_hit"] == 0:  # outside a VM: the share without steal is the share over every token's time
        assert st["pct_of_mem_read_without"] == pytest.approx(
            100 * d["bytes_per_token"] * 6 / sum(3 / x for x in d["runs_tok_s"]) / 1e9 / out["machine"]["mem_read_gbps"])
    # decode reads top-4 distinct experts in each of the 2 MoE layers
    ck = Checkpoint(tiny_path)
    expert = sum(ck.info(f"model.layers.1.mlp.experts.0.{p}_proj.weight_{s}").nbytes
                 for p in ("gate", "up", "down") for s in ("packed", "scale"))
    assert d["expert_bytes_per_token"] == 4 * 2 * expert
    # mmap mode: no cache; its disk figure is what page faults read, which the page cache's state decides
    # (test_expert_backend checks it against dropped pages)
    assert out["cache"] is None and out["settings"]["expert_mode"] == "mmap"
    split = d["split_ms_per_token"]  # the per-layer figures and overlap recomputed from the split
    for k, v in d["per_moe_layer_ms"].items():
        assert v == pytest.approx(split[k] / out["model"]["moe_layers"])
    assert d["overlap_efficiency"] == pytest.approx(max(0.0, 1 - split["experts_wait"] / split["experts_compute"]))
    assert out["settings"]["decode_graphs"] == "off" and out["settings"]["hot_experts"] == 0
    assert out["settings"]["gpu_precision"] == ("bf16" if torch.cuda.is_available() else "bf16w")
    # the per-component account: its bytes add up to the plan's weights, the experts' and the latent cache's
    comp, cfg = d["components"], ck.config
    weights = ("attention_projections", "attention_math", "router", "shared_expert", "dense_mlp", "head")
    latent = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * (8 + 4 / 2)  # fp32, mean length
    assert sum(comp[k]["bytes_per_token"] for k in weights) == pytest.approx(d["weight_bytes_per_token"] + latent)
    assert comp["experts"]["bytes_per_token"] == d["expert_bytes_per_token"]
    assert comp["experts"]["ms_per_token"] == pytest.approx(split["experts_compute"])
    assert all(comp[k]["bytes_per_token"] is None for k in ("experts_wait", "sampling", "dispatch_overhead"))
    in_forward = ("attention_projections", "attention_math", "router", "shared_expert", "dense_mlp", "head",
                  "experts_wait", "dispatch_overhead")
    assert sum(comp[k]["ms_per_token"] for k in in_forward) == pytest.approx(
        split["gpu_side"] + split["experts_wait"] + split["overhead"], rel=1e-6)
    pre = out["prefill"]  # prefill: 8 tokens in one pass, so weights read once per 8 tokens, the cache once at 8
    latent_pre = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * 8 / 8
    assert sum(pre["components"][k]["bytes_per_token"] for k in weights) == pytest.approx(
        d["weight_bytes_per_token"] / 8 + latent_pre)
    assert pre["components"]["experts"]["bytes_per_token"] == pre["expert_bytes_per_token"]
    assert sum(pre["components"][k]["ms_per_token"] for k in in_forward) == pytest.approx(
        pre["split_ms_per_token"]["gpu_side"] + pre["split_ms_per_token"]["experts_wait"]
        + pre["split_ms_per_token"]["overhead"], rel=1e-6)
    for c in [*comp.values(), *pre["components"].values()]:
        if c["gbps"] is not None:
            assert c["gbps"] == pytest.approx(c["bytes_per_token"] / c["ms_per_token"] / 1e6)
            assert c["pct_of_mem_read"] == pytest.approx(100 * c["gbps"] / out["machine"]["mem_read_gbps"])


def test_bench_probes_over_one_buffer_it_holds_until_the_last_probe(tiny_path, monkeypatch):
    """Each probe reads the same buffer, allocated once: one freed between runs came back from a VM's host
    as steal in the next run (probe_buffer)."""
    import hybrid
    from hybrid.bench import engine_bench as bench

    made, seen = [], []
    real_buffer, real_probe = bench.probe_buffer, bench.mem_read_gbps
    monkeypatch.setattr(bench, "probe_buffer", lambda nbytes: made.append(real_buffer(nbytes)) or made[-1])
    monkeypatch.setattr(bench, "mem_read_gbps", lambda buf: seen.append(buf) or real_probe(buf=buf))
    with hybrid.load(str(tiny_path), device="cpu") as engine:
        rep = bench.bench_engine(engine, 8, 3, 3, probe_bytes=4 << 20, warmup=False)
    assert len(made) == 1 and made[0].nbytes == 4 << 20 and len(seen) == 4 and all(b is made[0] for b in seen)
    assert len(rep["machine"]["mem_read_gbps_probes"]) == 4 and rep["machine"]["mem_read_gbps"] > 0


def _memory(address: int, nbytes: int) -> np.ndarray:
    """nbytes of this process's memory at address, as uint8 (no copy)."""
    import ctypes

    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address))


def test_in_place_spans_are_a_tokens_weights_and_k_experts_a_layer(tiny_path):
    """token_spans: every non-expert weight the engine holds (not the embedding) at its own address, then
    per MoE layer `experts_per_token` distinct experts' six parts, whose bytes in memory are the checkpoint
    file's bytes for those tensors (read from the file here), layer by layer with each layer's weights
    before its experts and the head last; read_spans over them reads those live bytes (checksum against
    NumPy). None with a RAM expert cache (its slots move) or a GPU side; the tiny model's token sits in the
    caches: no RAM figure."""
    import hybrid
    from hybrid.bench import in_place
    from kernels_cpu import membw
    from kernels_cpu.table import PARTS

    ck = Checkpoint(tiny_path)
    part_of = {}  # an expert tensor's bytes in the file -> (layer, expert, part)
    for layer in ck.config.moe_layers:
        for e in range(ck.config.n_routed_experts):
            for m, part in enumerate(PARTS):
                proj, suffix = part.split(".")
                info = ck.info(f"model.layers.{layer}.mlp.experts.{e}.{proj}.{suffix}")
                with open(info.file, "rb") as f:
                    f.seek(info.offset)
                    part_of[f.read(info.nbytes)] = (layer, e, m)
    with hybrid.load(str(tiny_path), device="cpu") as engine:
        at, ln = in_place.token_spans(engine, np.random.default_rng(0))
        spans = list(zip(at.tolist(), ln.tolist()))
        layer_of = {}
        for n, w in engine.model.w.items():
            if not n.startswith("model.embed"):
                key = int(n.split(".")[2]) if n.startswith("model.layers.") else 10**9  # the head last
                layer_of.update({(t.data_ptr(), t.nbytes): (key, 0) for t in (w if isinstance(w, tuple) else (w,))})
        assert set(layer_of) <= set(spans)
        seen = [part_of[_memory(a, n).tobytes()] for a, n in spans if (a, n) not in layer_of]  # KeyError: not one
        cfg, k = engine.config, engine.config.num_experts_per_tok
        assert len(seen) == len(cfg.moe_layers) * k * len(PARTS)
        for i, layer in enumerate(cfg.moe_layers):  # k distinct whole experts of each layer, parts in order
            got = seen[i * k * len(PARTS):(i + 1) * k * len(PARTS)]
            assert all(g[0] == layer for g in got) and [g[2] for g in got] == list(range(len(PARTS))) * k
            assert all(len({g[1] for g in got[j:j + len(PARTS)]}) == 1 for j in range(0, len(got), len(PARTS)))
            assert len({g[1] for g in got}) == k
        keys = [layer_of.get(sp) or (part_of[_memory(*sp).tobytes()][0], 1) for sp in spans]
        assert keys == sorted(keys) and keys[-1][0] == 10**9  # by layer, weights first, the head last
        pa, pl = membw.span_pieces(at, ln)
        for i, (_, lanes, unroll, streams) in enumerate(membw.SHAPES):
            total = nbytes = 0
            for a, n in zip(pa.tolist(), pl.tolist()):
                seg = n // streams // 64 * 64
                span = seg // (4 * lanes * unroll) * (4 * lanes * unroll)
                for j in range(streams):
                    total += int(_memory(a + j * seg, span).view(np.uint32).sum(dtype=np.uint64)) if span else 0
                    nbytes += span
            assert tuple(map(int, membw.read_spans(pa, pl, i, 2))) == (total % 2**32, nbytes)
        assert ln.sum() < in_place.MIN_BYTES and in_place.in_place_gbps(engine, np.random.default_rng(0)) is None
        dev, engine.device = engine.device, torch.device("cuda")  # as an engine with a GPU side sees itself
        assert in_place.token_spans(engine, np.random.default_rng(0)) is None
        engine.device = dev
    with hybrid.load(str(tiny_path), device="cpu", expert_mode="cache", cache_slots=12) as engine:
        assert engine.model.experts.mapped_tables is None
        assert in_place.token_spans(engine, np.random.default_rng(0)) is None


def test_in_place_by_component_reads_each_components_bytes(tiny_path, monkeypatch):
    """by_component groups a token's spans by the account's components: each group's bytes are what the
    account counts for that component (weights as held; k experts a MoE layer), each read after a flush;
    None for the tiny model as it is (under MIN_BYTES)."""
    import hybrid
    from hybrid.bench import account, in_place

    buf = np.ones(1 << 17, np.uint64)
    with hybrid.load(str(tiny_path), device="cpu") as engine:
        assert in_place.by_component(engine, np.random.default_rng(0), buf) is None
        read = []
        monkeypatch.setattr(in_place, "MIN_BYTES", 0)
        monkeypatch.setattr(in_place, "MIN_COMPONENT", 0)
        monkeypatch.setattr(in_place, "read_spans_gbps",
                            lambda at, ln, reps, flush: read.append((int(ln.sum()), reps, flush is buf)) or 7.0)
        got = in_place.by_component(engine, np.random.default_rng(0), buf, reads=2)
        want = {k: v for k, v in account.weight_bytes(engine).items() if v}
        cfg, ck = engine.config, Checkpoint(tiny_path)
        want["experts"] = len(cfg.moe_layers) * cfg.num_experts_per_tok * sum(
            ck.info(f"model.layers.{cfg.moe_layers[0]}.mlp.experts.0.{p}_proj.weight_{q}").nbytes
            for p in ("gate", "up", "down") for q in ("packed", "scale"))
    assert got == {k: 7.0 for k in want}
    assert sorted(read) == sorted((v, 2, True) for v in want.values())  # each flushed before every read


def test_bench_reports_the_in_place_reads_beside_the_probes(tiny_path, monkeypatch):
    """One in-place read beside each probe (before the runs, after each); the best is the figure and the
    decode's share divides by it; all null where none was measured (a small model)."""
    import hybrid
    from hybrid.bench import engine_bench as bench

    figures = iter([20.0, 25.0, None])
    monkeypatch.setattr(bench, "in_place_gbps", lambda engine, rng: next(figures))
    monkeypatch.setattr(bench, "by_component", lambda engine, rng, buf: {"experts": 10.0, "dense_mlp": 20.0})
    with hybrid.load(str(tiny_path), device="cpu") as engine:
        rep = bench.bench_engine(engine, 8, 3, 2, probe_bytes=4 << 20, warmup=False)
        m, d = rep["machine"], rep["decode"]
        assert m["mem_read_gbps_in_place_reads"] == [20.0, 25.0, None] and m["mem_read_gbps_in_place"] == 25.0
        assert d["pct_of_in_place"] == pytest.approx(100 * d["achieved_gbps"] / 25.0)
        for what, c in d["components"].items():
            g = {"experts": 10.0, "dense_mlp": 20.0}.get(what)
            assert c["in_place_gbps"] == g
            want = None if g is None or c["gbps"] is None else pytest.approx(100 * c["gbps"] / g)
            assert c["pct_of_in_place"] == want
        from rich.console import Console

        from hybrid.cli import bench as cli_bench  # the table shows the figures

        monkeypatch.setattr(cli_bench, "console", Console(width=220))  # its own: the shared one keeps its width
        with cli_bench.console.capture() as cap:
            cli_bench.render(rep)
        text = cap.get()
        assert "RAM read where the model sits" in text and f"{d['pct_of_in_place']:.1f}%" in text
        assert "in place GB/s" in text and " 10.0 " in text and " 20.0 " in text
        monkeypatch.setattr(bench, "in_place_gbps", lambda engine, rng: None)
        monkeypatch.setattr(bench, "by_component", lambda engine, rng, buf: None)
        rep = bench.bench_engine(engine, 8, 3, 1, probe_bytes=4 << 20, warmup=False)
    assert rep["machine"]["mem_read_gbps_in_place"] is None and rep["machine"]["mem_read_gbps_in_place_reads"] is None
    assert rep["decode"]["pct_of_in_place"] is None
    assert all(c["in_place_gbps"] is None and c["pct_of_in_place"] is None
               for c in rep["decode"]["components"].values())


def test_host_steal_reads_the_steal_column(tmp_path):
    from hybrid.runtime.probe import host_steal_s

    stat = tmp_path / "stat"  # /proc/stat's first line: user nice system idle iowait irq softirq steal ...
    stat.write_text("cpu  4705 150 1120 16250 520 0 30 250 0 0\ncpu0 2352 75 560 8125 260 0 15 125 0 0\n")
    assert host_steal_s(stat) == pytest.approx(250 / os.sysconf("SC_CLK_TCK"))
    stat.write_text("cpu  4705 150 1120 16250 520 0 30\n")  # a kernel without the column
    assert host_steal_s(stat) is None
    assert host_steal_s(tmp_path / "missing") is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux's /proc/stat")
def test_host_steal_rereads_proc_stat_through_its_descriptor():
    from hybrid.runtime.probe import host_steal_s

    def direct():
        with open("/proc/stat", "rb") as f:
            return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")

    first = host_steal_s()
    between = direct()
    assert first is not None and first <= between <= host_steal_s() <= direct()  # the counter only grows


def test_host_steal_sees_each_new_reading_through_its_open_descriptor(tmp_path, monkeypatch):
    from hybrid.runtime import probe

    stat = tmp_path / "stat"
    monkeypatch.setattr(probe, "_STAT", stat)  # the path host_steal_s keeps open
    monkeypatch.setattr(probe, "_stat_fd", None)
    tick = os.sysconf("SC_CLK_TCK")
    for steal in (250, 251, 9000):  # rewritten in place, as procfs regenerates the file on each read
        stat.write_text(f"cpu  4705 150 1120 16250 520 0 30 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
        assert probe.host_steal_s(stat) == pytest.approx(steal / tick)
    assert probe._stat_fd is not None  # the one descriptor, kept
    os.close(probe._stat_fd)


def test_bench_puts_the_hosts_steal_on_the_tokens_it_fell_in(tiny_path, monkeypatch):
    """A steal counter that moves by 30 ms at every third reading: the tokens read after it moved are the
    ones hit, and the ms per token is the whole movement over the decoded tokens."""
    import hybrid
    from hybrid.bench import engine_bench as bench

    reads = []

    def counter():
        reads.append(None)
        return 0.03 * (len(reads) // 3)

    monkeypatch.setattr(bench, "host_steal_s", counter)
    recorded, add = [], bench._Phase.add  # each run's per-token times, as the decode phase receives them

    def keep(self, tokens, wall_s, stats, token_s=None, steal_s=None):
        if token_s is not None:
            recorded.extend(token_s)
        return add(self, tokens, wall_s, stats, token_s, steal_s)

    monkeypatch.setattr(bench._Phase, "add", keep)
    with hybrid.load(str(tiny_path), device="cpu") as engine:
        rep = bench.bench_engine(engine, 8, 5, 2, mem_gbps=1.0, warmup=False)
    # each run reads once before its 4 decoded tokens and once after each: readings 1-5, then 6-10
    values = [0.03 * (n // 3) for n in range(1, 11)]
    deltas = [b - a for a, b in zip(values[:5], values[1:5])] + [b - a for a, b in zip(values[5:], values[6:])]
    st = rep["decode"]["host_steal"]
    assert len(reads) == 10 and st["tokens"] == 8 and st["tokens_hit"] == sum(d > 0 for d in deltas) == 2
    assert st["ms_per_token"] == pytest.approx(1e3 * sum(deltas) / 8)
    clean = [t for t, d in zip(recorded, deltas) if d == 0]  # the 6 tokens the steal missed
    d = rep["decode"]
    assert len(recorded) == 8 and sum(recorded) == pytest.approx(sum(4 / x for x in d["runs_tok_s"]), rel=1e-9)
    assert st["pct_of_mem_read_without"] == pytest.approx(100 * d["bytes_per_token"] * 6 / sum(clean) / 1e9)
    assert d["pct_of_mem_read_paired"] is None  # the bandwidth was passed in: no probes to pair the runs with
    monkeypatch.setattr(bench, "host_steal_s", lambda: None)  # a system without the counter
    with hybrid.load(str(tiny_path), device="cpu") as engine:
        assert bench.bench_engine(engine, 8, 3, 1, mem_gbps=1.0, warmup=False)["decode"]["host_steal"] is None


def test_bench_runs_never_reuse_an_earlier_calls_prompts(tiny_path, monkeypatch):
    """Two bench calls with one seed on one engine (compare_llamacpp's warm-up, then its first round): every
    run still prefills its whole prompt; a run whose prompt the KV store could serve is refused, not timed."""
    import itertools

    import hybrid
    from hybrid.bench import engine_bench as bench

    with hybrid.load(str(tiny_path), device="cpu") as engine:
        for _ in range(2):
            rep = bench.bench_engine(engine, 8, 2, 2, mem_gbps=1.0, warmup=False, seed=0)
            assert rep["kv"]["prompt_tokens"] == 8 and rep["kv"]["reused_tokens"] == 0
        monkeypatch.setattr(bench, "_STARTS", itertools.repeat(5))  # every run starting alike: run 1 meets run 0
        with pytest.raises(RuntimeError, match="bench run 1: 2 of the prompt's 8 tokens came from the KV store"):
            bench.bench_engine(engine, 8, 2, 2, mem_gbps=1.0, warmup=False, seed=0)


def test_device_reaches_the_plan(tiny_path, monkeypatch):
    args = ["run", "hi", "-m", str(tiny_path), "--max-tokens", "2"]
    import hybrid.runtime.loader as loader  # the commands load through the runtime's loader, imported when they run

    seen = {}
    load = loader.load
    monkeypatch.setattr(loader, "load", lambda path, **kw: (seen.update(kw), load(path, **kw))[1])
    assert CliRunner().invoke(main, args + ["--device", "cpu"]).exit_code == 0
    assert seen["device"] == "cpu"
    monkeypatch.undo()
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, args + ["--device", "cuda"])
        assert r.exit_code == 1 and "device 'cuda' asked for, but no CUDA GPU was detected" in r.output, r.output


def test_cpu_prompt_math_reaches_the_model(tiny_path, monkeypatch):
    """--cpu-prompt-math bf16 runs the prompt's products in bf16 where the CPU has AVX512_BF16 or AMX
    (the bench says so), and is refused in one line naming what is missing where it has neither."""
    args = ["bench", "-m", str(tiny_path), "--prompt-tokens", "12", "--gen-tokens", "2", "--runs", "1",
            "--probe-mb", "16", "--device", "cpu", "--json", "--cpu-prompt-math", "bf16"]
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "needs a CPU with AVX512_BF16 or AMX" in r.output and "Traceback" not in r.output, \
        r.output
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # torch computes bf16 on any CPU
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["settings"]["cpu_prompt_math"] == "bf16"
    r = CliRunner().invoke(main, args[:-1] + ["fp16"])
    assert r.exit_code == 2 and "'fp16' is not one of" in r.output


def test_gpu_precision_reaches_the_plan(tiny_path):
    """--gpu-precision goes to hybrid.load's plan: without CUDA, bf16 is refused in one line that
    names the option, and int8 runs the CPU side over int8 weights; auto runs everywhere."""
    args = ["run", "hi", "-m", str(tiny_path), "--max-tokens", "2"]
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, args + ["--gpu-precision", "bf16"])
        assert r.exit_code == 1 and "gpu_precision 'bf16' needs a CUDA GPU" in r.output and "--gpu-precision auto" \
            in r.output and "Traceback" not in r.output, r.output
        r = CliRunner().invoke(main, ["bench", "-m", str(tiny_path), "--prompt-tokens", "8", "--gen-tokens", "4",
                                      "--runs", "1", "--probe-mb", "16", "--gpu-precision", "int8", "--json"])
        assert r.exit_code == 0 and json.loads(r.output.strip().splitlines()[-1])["settings"]["gpu_precision"] == "int8w"
    assert CliRunner().invoke(main, args + ["--gpu-precision", "auto"]).exit_code == 0
    r = CliRunner().invoke(main, args + ["--gpu-precision", "fp8"])
    assert r.exit_code == 2 and "'fp8' is not one of" in r.output


def test_bench_with_decode_graphs_says_so(tiny_path):
    args = ["bench", "-m", str(tiny_path), "--prompt-tokens", "8", "--gen-tokens", "4", "--runs", "1", "--probe-mb", "16",
            "--decode-graphs", "on", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    check_schema(out)
    assert out["settings"]["decode_graphs"] == "token"  # no CUDA: the one-graph-per-token step, eagerly
    r = CliRunner().invoke(main, args[:-2] + ["segments", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["settings"]["decode_graphs"] == "segments"


def test_bench_reports_the_expert_cache(tiny_path):
    args = ["bench", "-m", str(tiny_path), "--prompt-tokens", "8", "--gen-tokens", "4", "--runs", "1", "--probe-mb", "16",
            "--expert-mode", "cache", "--ram-budget", "0.0005", "--json"]  # 0.5 MB: about half of tiny's 32 experts
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    check_schema(out)
    c = out["cache"]
    assert out["settings"]["expert_mode"] == "cache" and c["misses"] > 0 and c["hit_rate"] == c["hits"] / (c["hits"] + c["misses"])


def test_bench_table_and_mistakes(tiny_path):
    args = ["bench", "-m", str(tiny_path), "--prompt-tokens", "8", "--gen-tokens", "3", "--runs", "1", "--probe-mb", "16"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    for text in ("prompt processing (pp8)", "generation (tg3)", "where the time goes", "measured in this run"):
        assert text in r.output
    r = CliRunner().invoke(main, args + ["--context", "16", "--prompt-tokens", "20"])
    assert r.exit_code == 1 and "exceed the context of 16 tokens" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["bench", "--small"])
    assert r.exit_code == 1 and "go with --kernels" in r.output


def test_the_schema_check_catches_drift():
    with pytest.raises(AssertionError, match="not in docs"):
        check_schema({"schema": "x", "surprise": 1})
    with pytest.raises(AssertionError, match="missing"):
        check_schema({"schema": "x"})


def test_bench_kernels_is_still_there(monkeypatch):
    import hybrid.bench.kernel_bench as kb

    monkeypatch.setattr(kb, "run_kernel_bench", lambda small, threads: {"mem_read_gbps": 25.0, "moe_decode": {"ms": 48.0}})
    r = CliRunner().invoke(main, ["bench", "--kernels", "--small", "--json"])
    assert r.exit_code == 0 and json.loads(r.output) == {"mem_read_gbps": 25.0, "moe_decode": {"ms": 48.0}}
    r = CliRunner().invoke(main, ["bench", "--kernels", "--small"])
    assert r.exit_code == 0 and "48.00" in r.output


def test_bench_kernels_table_is_in_words(monkeypatch):
    """The table names each figure in words with its unit; --json keeps the keys (above)."""
    import hybrid.bench.kernel_bench as kb

    result = {"mem_read_gbps": 25.0, "moe_decode": {"ms": 0.0669, "pct_of_mem_read": 2.2},
              "threads": {"1": {"decode_gbps": 2.4}}, "peers": {"torch_int4pack": {"prefill_16": {"gbps": None}}}}
    monkeypatch.setattr(kb, "run_kernel_bench", lambda small, threads: result)
    r = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["bench", "--kernels", "--small"])
    assert r.exit_code == 0 and not re.findall(r"[a-z_]+\.[a-z_0-9]+", r.output), r.output  # no dotted keys
    for says in ("RAM read bandwidth, measured in this run (GB/s)", "routed experts, decode", "time (ms)", "0.0669",
                 "share of the RAM bandwidth (%)", "1 thread: decode bandwidth (GB/s)",
                 "torch int4pack: prefill, 16 tokens: bandwidth (GB/s)"):
        assert says in r.output, says


# ---- plan -----------------------------------------------------------------------------------------

WORKSTATION = ["--ram-gb", "768", "--gpu-gb", "24", "--mem-gbps", "300", "--gpu-gbps", "1000"]


def test_plan_for_a_workstation_to_buy():
    r = CliRunner().invoke(main, ["plan", *WORKSTATION, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["machine"]["hypothetical"] and out["machine"]["measured_here"] == []
    rows = {row["what"].split(" (")[0]: row for row in out["plan"]["rows"]}
    assert rows["attention"]["where"] == "gpu" and rows["routed experts"]["where"] == "mmap"
    assert round(rows["routed experts"]["gb"]) == 571
    proj = out["projection"]
    # all 571 GB of experts in RAM: 11.9 GB per token over 300 GB/s is the ceiling, ~25 tok/s (DESIGN.md)
    assert proj["bottleneck"] == "ram" and proj["tok_s"] == pytest.approx(300e9 / proj["routed_bytes_per_token"])
    assert 24 < proj["tok_s"] < 26
    r = CliRunner().invoke(main, ["plan", *WORKSTATION])
    assert r.exit_code == 0
    for text in ("hypothetical machine", "placement plan", "routed experts", "projected decode speed", "bottleneck"):
        assert text in r.output


def test_plan_with_an_expert_cache_counts_the_disk():
    r = CliRunner().invoke(main, ["plan", "--ram-gb", "128", "--gpu-gb", "24", "--mem-gbps", "100",
                                  "--gpu-gbps", "1000", "--disk-gbps", "7", "--hit-rate", "0.9", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["plan"]["expert_mode"] == "cache"
    proj = out["projection"]
    assert proj["disk_bytes"] == pytest.approx(0.1 * proj["cpu_expert_bytes"], rel=1e-6)
    assert proj["bottleneck"] == "disk" and proj["tok_s"] == pytest.approx(7e9 / proj["disk_bytes"], rel=1e-6)


def test_plan_refusals_are_one_line():
    r = CliRunner().invoke(main, ["plan", "--ram-gb", "24", "--mem-gbps", "20"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "the plan does not fit: RAM is short" in r.output
    r = CliRunner().invoke(main, ["plan", *WORKSTATION, "--context", "9999999"])
    assert r.exit_code == 1 and "context 9999999 must lie in" in r.output
    r = CliRunner().invoke(main, ["plan", "--expert-mode", "sometimes"])
    assert r.exit_code == 2 and "'sometimes' is not one of" in r.output


def test_plan_a_preset_on_this_machine():
    r = CliRunner().invoke(main, ["plan", "-m", "tiny", "--mem-gbps", "20", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["model"] == "preset tiny" and not out["machine"]["hypothetical"]
    assert out["projection"]["tok_s"] > 0
    r = CliRunner().invoke(main, ["plan", "-m", "tiny", "--mem-gbps", "20", "--gpu-gbps", "10", "--device", "cpu"])
    assert r.exit_code == 0 and "--gpu-gbps ignored" in r.output
    # two GPUs: planned on the first, the second's worth said (tests/test_plan_guide.py); --device cpu plans without
    r = CliRunner().invoke(main, ["plan", "-m", "tiny", "--mem-gbps", "20", "--gpu-gb", "8", "--gpu-gb", "80"])
    assert r.exit_code == 0 and "GPU 1 (80 GB) stays idle" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["plan", "-m", "tiny", "--mem-gbps", "20", "--ram-gb", "64", "--gpu-gb", "24",
                                  "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["plan"]["device"] == "cpu" and {row["where"] for row in out["plan"]["rows"]} <= {"ram", "mmap", "cache"}
    # a GPU that holds every expert and whose bandwidth is not given: the figure is "not counted"
    r = CliRunner().invoke(main, ["plan", "-m", "tiny", "--mem-gbps", "20", "--ram-gb", "64", "--gpu-gb", "24"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "pass gpu_gbps" in r.output and "not counted" in r.output


# ---- chat (the pseudo-terminal tests are in test_cli_chat.py) ----------------------------------

def test_chat_commands_through_piped_input(tiny_path, tmp_path):
    saved = tmp_path / "conv.json"
    script = "\n".join([
        "hello", "/system You are terse.", "/system", "/think off", "second\\", "line two",
        f"/save {saved}", "/reset", f"/load {saved}", "/think", "/stats", "/bogus", "/load /no/such/file",
        '"""', "a", "block", '"""', "/exit", "never read"]) + "\n"
    r = CliRunner().invoke(main, ["chat", "-m", str(tiny_path), "--max-tokens", "6", "--temperature", "0"], input=script)
    assert r.exit_code == 0, r.output
    assert r.output.count("[cut at --max-tokens] prompt") == 3  # hello, the continued line, the block
    for text in ("system prompt: You are terse.", "conversation cleared (system prompt kept)",
                 "saved 5 messages (system prompt and 4 more)", "loaded 5 messages (system prompt and 4 more)",
                 "unknown command /bogus", "answers,", "thought:"):
        assert text in r.output, text
    assert "/no/such/file: no such file" in r.output and "Errno" not in r.output
    data = json.loads(saved.read_text())
    roles = [m["role"] for m in data["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert data["messages"][3]["content"] == "second\nline two"
    assert all("reasoning_content" in m for m in data["messages"] if m["role"] == "assistant")


def test_chat_loads_a_conversation_and_rejects_a_bad_one(tiny_path, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello", "reasoning_content": "greet back"}]))
    r = CliRunner().invoke(main, ["chat", "-m", str(tiny_path), "--load", str(good), "--max-tokens", "3", "--seed", "0"],
                           input="and now?\n")  # Ctrl-D (end of input) leaves; seeded: an unseeded draw may stop
    assert r.exit_code == 0, r.output
    assert "loaded 2 messages" in r.output and "[cut at --max-tokens] prompt" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}))
    r = CliRunner().invoke(main, ["chat", "-m", str(tiny_path), "--load", str(bad)])
    assert r.exit_code == 1 and "message 0 needs a \"role\"" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["chat", "-m", str(tiny_path), "--top-p", "0"])
    assert r.exit_code == 2 and "--top-p" in r.output


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("tools, says", [
    ([{"type": "function"}], "tool 0 must be an object"),
    ([TOOL, 5], "tool 1 must be an object"),
    ([{"type": "retrieval", "function": {"name": "f"}}], "tool 0 must be an object"),
    ([{"type": "function", "function": {"description": "no name"}}], "tool 0: function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": ["a"]}}], "tool 0 (f): function.parameters"),
    ({"type": "function"}, "must be a list of tool definitions"),
])
def test_chat_tools_file_is_checked_entry_by_entry(tmp_path, tools, says):
    f = tmp_path / "tools.json"
    f.write_text(json.dumps(tools))
    with pytest.raises(UserError, match=re.escape(f"{f}: ") + ".*" + re.escape(says)):
        validate_tools(tools, str(f))
    r = CliRunner().invoke(main, ["chat", "-m", str(tmp_path / "never-loaded"), "--tools", str(f)])
    assert r.exit_code == 1 and says in r.output and str(f) in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("folder", ["a{0}", "b{x}", "c{}"])
def test_a_tools_file_path_with_braces_is_just_a_path(tmp_path, folder):
    f = tmp_path / folder / "tools.json"
    f.parent.mkdir()
    assert validate_tools([TOOL], str(f)) == [TOOL]
    with pytest.raises(UserError, match=re.escape(f"{f}: tool 1 must be an object")):
        validate_tools([TOOL, 5], str(f))


@pytest.mark.parametrize("messages, says", [
    ([{"role": "user"}], 'message 0 (user) needs a "content"'),
    ([{"role": "system", "content": None}], 'message 0 (system) needs a "content"'),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}], 'message 1 has a "content" that is not'),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "message 0: content part 0"),
    ([{"role": "user", "content": ["hi"]}], "message 0: content part 0"),
    ([{"role": "tool", "content": "sunny"}], "message 0 (tool) needs the \"tool_call_id\""),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}], 'message 0: "tool_calls" must be'),
    ([{"role": "assistant", "content": "", "reasoning_content": ["x"]}], 'message 0: "reasoning_content"'),
    ({"messages": [], "tools": [5]}, "tool 0 must be an object"),
])
def test_loaded_conversations_are_checked_message_by_message(messages, says):
    with pytest.raises(UserError, match=re.escape(f"saved.json: {says}")):
        validate_messages(messages, "saved.json")


def test_a_tool_call_turn_without_text_loads():
    call = {"id": "functions.get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    assert validate_messages({"messages": messages, "tools": [TOOL]}, "saved.json") == (messages, [TOOL])


def test_serve_hands_the_options_to_the_server(tiny_path, monkeypatch):
    import hybrid.serve.app

    seen = {}
    monkeypatch.setattr(hybrid.serve.app, "serve", lambda model, **kw: seen.update(kw, model=model))
    r = CliRunner().invoke(main, ["serve", "-m", str(tiny_path), "--port", "9001", "--api-key", "K", "--context", "2048",
                                  "--keepalive", "2.5"])
    assert r.exit_code == 0, r.output
    assert seen["model"] == str(tiny_path) and seen["port"] == 9001 and seen["api_key"] == "K"
    assert seen["keepalive_s"] == 2.5
    assert seen["context"] == 2048 and seen["host"] == "127.0.0.1" and "backend" not in seen
    r = CliRunner().invoke(main, ["serve", "-m", "someorg/not-here"])
    assert r.exit_code == 1 and "hf download someorg/not-here" in r.output


def test_chat_confirms_the_tools_it_loaded(tiny_path, tmp_path):
    f = tmp_path / "tools.json"
    f.write_text(json.dumps([TOOL, {"type": "function", "function": {"name": "search"}}]))
    r = CliRunner().invoke(main, ["chat", "-m", str(tiny_path), "--tools", str(f)], input="")
    assert r.exit_code == 0, r.output
    assert f"tools: 2 loaded from {f} (get_weather, search)" in r.output
    r = CliRunner().invoke(main, ["chat", "-m", str(tiny_path), "--tools", str(tmp_path)])
    assert r.exit_code == 2  # click refuses a folder before anything loads
