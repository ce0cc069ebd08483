"""The kimi-hybrid command through click's CliRunner: generate, info, errors without tracebacks."""
from __future__ import annotations

import json

from click.testing import CliRunner

from hybrid.checkpoint import Checkpoint
from hybrid.cli import main

from .conftest import REAL_CONFIG


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
    assert "prompt" in r.output and (("[length]" in r.output and "5 generated" in r.output) or "[stop]" in r.output)
