"""A new user's first hour (issue 18), through click's CliRunner: one default model and what is said when it is
missing, did-you-mean, GGUF, a partial download, --version, the context default in --help, doctor, `run` for
scripts (piped stdout holds only the answer; --json) and the warm-up that keeps compiling out of tok/s."""
from __future__ import annotations

import io
import json
from importlib import metadata

import pytest
from click.testing import CliRunner
from rich.console import Console

import hybrid.cli.common as common
import hybrid.cli.warmup as warmup
from hybrid.cli.chat_ui import status_line
from hybrid.cli.main import main
from hybrid.runtime.completion import collect
from hybrid.runtime.resolve import REAL_MODEL
from hybrid.text.conversation import Done
from hybrid.text.parser import ContentDelta, ReasoningDelta, ToolCall


# ---- one model story ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "chat", "serve", "info"])
def test_every_command_has_the_same_default_model(command):
    opt = next(p for p in main.commands[command].params if p.name == "model")
    assert opt.default == common.DEFAULT_MODEL == REAL_MODEL


@pytest.mark.parametrize("args", [["run", "hi"], ["chat"], ["serve"], ["info"]])
def test_the_missing_default_says_how_to_fetch_it_and_suggests_tiny(args, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"hf download {REAL_MODEL}" in r.output and "--model tiny" in r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("typo, meant", [("tinny", "tiny"), ("k2-slise", "k2-slice"), ("k2-full-sparce", "k2-full-sparse")])
def test_a_misspelt_preset_gets_did_you_mean(typo, meant, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["run", "hi", "-m", typo])
    assert r.exit_code == 1 and f"did you mean {meant}?" in r.output, r.output
    r = CliRunner().invoke(main, ["run", "hi", "-m", "zzzzzz"])
    assert "did you mean" not in r.output


@pytest.mark.parametrize("exists", [True, False])
def test_a_gguf_path_is_told_which_format_this_runtime_reads(exists, tmp_path):
    f = tmp_path / "Kimi-K2-Thinking-Q4_K_M.gguf"
    if exists:
        f.write_bytes(b"GGUF")
    r = CliRunner().invoke(main, ["run", "hi", "-m", str(f)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    for says in ("GGUF", "native INT4", "safetensors", "as Moonshot ships it", f"hf download {REAL_MODEL}"):
        assert says in r.output, says


def test_a_partial_download_lists_every_missing_shard(tiny_path, tmp_path):
    part = tmp_path / "partial"
    part.mkdir()
    shards = sorted(p.name for p in tiny_path.glob("*.safetensors"))
    assert len(shards) >= 3
    for f in tiny_path.iterdir():
        if f.name not in shards[1:3]:
            (part / f.name).symlink_to(f)
    r = CliRunner().invoke(main, ["info", "-m", str(part)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "2 shard(s) missing" in r.output and all(s in r.output for s in shards[1:3]) and shards[0] not in r.output
    assert "hf download" in r.output and "resumes" in r.output


def test_version():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"kimi-hybrid, version {metadata.version('kimi-hybrid')}"


@pytest.mark.parametrize("command", ["run", "chat", "serve"])
def test_help_shows_the_context_default(command):
    r = CliRunner(env={"COLUMNS": "200"}).invoke(main, [command, "--help"])
    assert r.exit_code == 0
    line = next(x for x in r.output.splitlines() if "--context" in x)
    assert "[default: 4096]" in line


# ---- doctor ---------------------------------------------------------------------------------------

def test_doctor_reports_the_environment(tmp_path, monkeypatch):
    import torch

    from kernels_cpu.simd import host_features

    monkeypatch.setenv("KIMI_HYBRID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    r = CliRunner().invoke(main, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    env = json.loads(r.stdout)
    assert env["torch"] == torch.__version__ and env["cpu_features"] == host_features()
    assert env["numba_threading"].split(",")[0] in ("omp", "tbb", "workqueue")
    assert env["cuda"]["available"] == torch.cuda.is_available() and env["cache_dir"] == str(tmp_path / "cache")
    assert env["ram_gb"]["total"] > 0 and "hf download" in env["models"][REAL_MODEL]
    assert env["models"]["tiny"] == "not generated yet (made on first use)"
    assert env["ram_read_gbps"] > 0 and env["disk_read_gbps"] > 0  # measured (a 256 MB scratch file, deleted)
    assert list((tmp_path / "cache").glob("*")) == []
    r = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["doctor", "--no-measure"])
    assert r.exit_code == 0 and "threading layer" in r.output and "CPU kernels" in r.output
    assert "reads at" not in r.output


def test_doctor_shows_the_speeds_it_measured(monkeypatch):
    import hybrid.cli.doctor as doctor

    monkeypatch.setattr(doctor, "mem_read_gbps", lambda nbytes: 41.25)
    monkeypatch.setattr(doctor, "disk_read_gbps", lambda directory, nbytes: 3.456)
    r = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["doctor"])
    assert r.exit_code == 0 and "reads at 41.2 GB/s" in r.output and "reads at 3.46 GB/s" in r.output


# ---- run for scripts --------------------------------------------------------------------------------

CALL = ToolCall("functions.get_weather:0", "get_weather", '{"city": "Paris"}')


class FakeEngine:
    """What run and chat use of an Engine, with a fixed answer; records the calls in order."""

    context = 4096

    def __init__(self, events):
        self.events, self.calls = events, []

    def generate(self, ids, max_new_tokens, temperature=1.0, seed=None):
        self.calls.append("generate")
        yield from ()

    def reset_stats(self):
        self.calls.append("reset_stats")

    def chat(self, messages, tools=None, **sampling):
        self.calls.append("chat")
        yield from self.events

    def complete(self, messages, tools=None, **sampling):
        return collect(self.chat(messages, tools, **sampling))

    def close(self):
        self.calls.append("close")


def answer(*events):
    return [*events, Done("stop", 20, 20, 6, 3, 0.5, 0.25)]


@pytest.fixture()
def fake(monkeypatch, tiny_path):
    made = []

    def install(events):
        monkeypatch.setattr(common, "load", lambda path, **kw: made.append(FakeEngine(events)) or made[-1])
        return made
    return install


def test_piped_run_writes_only_the_answer_to_stdout(fake, tiny_path):
    fake(answer(ReasoningDelta("let me think"), ContentDelta("The answer"), ContentDelta(" is 4.")))
    r = CliRunner().invoke(main, ["run", "2+2?", "-m", str(tiny_path)])
    assert r.exit_code == 0, r.output
    assert r.stdout == "The answer is 4.\n"
    assert "let me think" in r.stderr and "[finished] prompt 20 tokens" in r.stderr
    assert "/think" not in r.output  # chat's hints are not run's


def test_piped_run_on_the_tiny_model_matches_its_json(tiny_path):
    args = ["run", "hello", "-m", str(tiny_path), "--max-tokens", "6", "--temperature", "0"]
    plain, as_json = CliRunner().invoke(main, args), CliRunner().invoke(main, [*args, "--json"])
    assert plain.exit_code == 0 and as_json.exit_code == 0, plain.output + as_json.output
    out = json.loads(as_json.stdout)
    assert plain.stdout == (out["content"] + "\n" if out["content"] else "")
    assert out["usage"]["completion_tokens"] == 6 and out["finish_reason"] == "length"
    assert "cut at --max-tokens" in plain.stderr


def test_run_json_holds_answer_reasoning_tool_calls_and_usage(fake, tiny_path):
    fake(answer(ReasoningDelta("weather?"), ContentDelta("Checking."), CALL))
    r = CliRunner().invoke(main, ["run", "weather in Paris?", "-m", str(tiny_path), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["content"] == "Checking." and out["reasoning"] == "weather?" and out["finish_reason"] == "stop"
    assert out["tool_calls"] == [{"id": CALL.id, "name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert out["usage"] == {"prompt_tokens": 20, "cached_tokens": 0, "completion_tokens": 6, "reasoning_tokens": 3,
                            "prefill_s": 0.5, "decode_s": 0.25, "prefill_tok_s": 40.0, "decode_tok_s": 20.0}


def test_a_full_context_is_announced(tiny_path):
    r = CliRunner().invoke(main, ["run", "hello", "-m", str(tiny_path), "--context", "60", "--max-tokens", "100",
                                  "--temperature", "0"])
    assert r.exit_code == 0, r.output
    assert "[context full (60 tokens): raise --context]" in r.stderr
    done = Done("length", 50, 50, 14, 14, 1.0, 1.0)
    assert "context full (64 tokens): raise --context or /reset" in status_line(done, 64).plain
    assert status_line(done, 4096).plain.startswith("[cut at --max-tokens]")


# ---- the warm-up: compiling before the first prompt, never inside a tok/s ------------------------

def test_the_engine_is_warmed_up_before_the_first_prompt(fake, tiny_path):
    made = fake(answer(ContentDelta("hi")))
    assert CliRunner().invoke(main, ["run", "hi", "-m", str(tiny_path)]).exit_code == 0
    assert made[-1].calls == ["generate", "reset_stats", "chat"]  # the statistics restart after it


@pytest.mark.parametrize("cached, says", [(False, "compiling CPU kernels, first run only"), (True, "warming up")])
def test_the_warm_up_says_what_it_waits_for(monkeypatch, cached, says):
    monkeypatch.setattr(warmup, "kernels_cached", lambda: cached)
    out = io.StringIO()
    warmup.warm_up(FakeEngine([]), Console(file=out, force_terminal=True, width=200))
    assert says in out.getvalue()


def test_kernels_cached_reads_numbas_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert not warmup.kernels_cached()
    (tmp_path / "kernels_cpu").mkdir()
    (tmp_path / "kernels_cpu" / "moe._moe-116.py311.nbi").write_bytes(b"")
    assert warmup.kernels_cached()


def test_info_shows_what_it_validates(tiny_path, tmp_path):
    import sys

    import pexpect

    child = pexpect.spawn(sys.executable, ["-c", "from hybrid.cli.main import main; main()", "info", "-m", str(tiny_path)],
                          cwd=str(tmp_path), encoding="utf-8", timeout=30, dimensions=(40, 160))
    child.expect_exact("validating")  # a spinner on a terminal while every header is checked
    child.expect_exact("(validated)")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
