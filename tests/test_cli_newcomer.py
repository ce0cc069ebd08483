"""A new user's first hour (issue 18), through click's CliRunner: one default model and what is said when it is
missing, did-you-mean, GGUF, a partial download, --version, the context default in --help, doctor, `run` for
scripts (piped stdout holds only the answer; --json) and the warm-up that keeps compiling out of tok/s."""
from __future__ import annotations

import io
import json
import logging
import re
import socket
import subprocess
import sys
from importlib import metadata

import pytest
from click.testing import CliRunner
from rich.console import Console

import hybrid
import hybrid.cli.common as common
import hybrid.cli.warmup as warmup
import hybrid.runtime.loader as loader
from hybrid.cli.chat_ui import status_line
from hybrid.cli.main import main
from hybrid.runtime.completion import collect
from hybrid.runtime.options import LoadOptions
from hybrid.runtime.resolve import REAL_MODEL
from hybrid.text.conversation import Done
from hybrid.text.parser import ContentDelta, ReasoningDelta, ToolCall


# ---- one model story ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "chat", "serve", "info"])
def test_every_command_has_the_same_default_model(command):
    opt = next(p for p in main.commands[command].params if p.name == "model")
    assert opt.default == common.DEFAULT_MODEL == REAL_MODEL


@pytest.mark.parametrize("args", [["run", "hi"], ["chat"], ["serve"], ["info"], ["bench", "-m", REAL_MODEL]])
def test_the_missing_default_says_how_to_fetch_it_and_suggests_tiny(args, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"hf download {REAL_MODEL}" in r.output and "--model tiny" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_bench_says_why_its_default_is_not_the_real_model():
    opt = next(p for p in main.commands["bench"].params if p.name == "model")
    assert opt.default == "k2-slice" != common.DEFAULT_MODEL
    assert "on purpose" in opt.help and "real layer shapes" in opt.help and f"-m {REAL_MODEL}" in opt.help


def test_plan_without_a_model_plans_the_real_k2_from_its_shipped_config():
    r = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["plan", "--help"])
    assert "default: the real Kimi K2 Thinking config" in " ".join(r.output.split())
    r = CliRunner(env={"COLUMNS": "250"}).invoke(main, ["plan", "--ram-gb", "768", "--gpu-gb", "24", "--json"])
    out = json.loads(r.output)
    assert r.exit_code == 0 and "Kimi K2 Thinking" in out["model"] and "8 x 60 layers" in out["projection"]["explain"][0]


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


HELP_ONLY = """
import sys
from hybrid.cli.main import main
for args in ([], *([name] for name in main.commands)):
    try:
        main([*args, "--help"], prog_name="kimi-hybrid")
    except SystemExit as e:
        assert e.code == 0, (args, e.code)
print(sorted(m for m in ("torch", "numba", "fastapi", "hybrid.runtime.loader") if m in sys.modules))
import hybrid
print(sorted(m for m in ("torch", "numba") if m in sys.modules), set(hybrid.__all__) <= set(dir(hybrid)))
"""


def test_help_imports_neither_torch_nor_numba():
    """--help (of the group and of every command) parses before anything heavy loads; so does `import hybrid`.
    Not a timing test: what makes --help slow is torch and Numba being imported, so that is what it checks."""
    r = subprocess.run([sys.executable, "-c", HELP_ONLY], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-2:] == ["[]", "[] True"], r.stdout[-500:]


def test_the_public_names_are_there_on_first_use():
    code = ("import hybrid, inspect; print(sorted(n for n in hybrid.__all__ if getattr(hybrid, n) is not None)); "
            "print('context' in inspect.signature(hybrid.load).parameters)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split("\n")[:2] == [str(sorted(hybrid.__all__)), "True"], r.stderr[-2000:]
    from hybrid.runtime.engine import Engine

    assert hybrid.Engine is Engine and hybrid.load.__doc__ == hybrid.runtime.loader.load.__doc__


@pytest.mark.parametrize("command", ["run", "chat", "bench", "serve", "plan"])
def test_help_shows_the_context_default(command):
    """Each command's help says in words the context it loads with: the plan's, or serve's at least 32K."""
    from hybrid.runtime.context import DEFAULT_HELP
    from hybrid.serve.limits import SERVE_CONTEXT_HELP

    r = CliRunner().invoke(main, [command, "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())  # click wraps the help
    flag = text[text.index("--context INTEGER RANGE"):].split(" --")[0]
    assert f"[default: {SERVE_CONTEXT_HELP if command == 'serve' else DEFAULT_HELP}]" in flag
    assert "4K-128K" in flag and "10%" in flag


def serve_sees(tiny_path, monkeypatch, **kw) -> dict:
    """The keywords serve() hands hybrid.load (stopped there)."""
    import hybrid.serve.app as app

    seen = {}

    def load(model, **options):
        seen.update(options)
        raise RuntimeError("stop here")

    monkeypatch.setattr("hybrid.runtime.loader.load", load)
    with pytest.raises(RuntimeError, match="stop here"):
        app.serve(str(tiny_path), port=9011, **kw)
    return seen


def test_serve_keeps_32k_where_it_fits_the_same_share(tiny_path, monkeypatch):
    """Without --context, serve loads the plan's choice, raised to SERVE_CONTEXT where its KV pages take <= 10% of
    the same memory; here a GPU the plan keeps bf16 weights on at 16K (room, not the share, stops 32K), so the
    server takes 32K (int8 weights) while hybrid.load would take 16K. An explicit context is kept."""
    from hybrid.checkpoint.config import ModelConfig
    from hybrid.runtime.context import KV_SHARE
    from hybrid.runtime.hardware import Hardware
    from hybrid.runtime.placement import plan
    from hybrid.serve.limits import SERVE_CONTEXT
    from tests.conftest import REAL_CONFIG

    k2 = ModelConfig.from_file(REAL_CONFIG)
    # the tiny checkpoint is only there to be resolved: K2's config is planned
    monkeypatch.setattr("hybrid.checkpoint.config.ModelConfig.from_file", lambda path: k2)
    hw = Hardware.hypothetical(128, [24.7])
    monkeypatch.setattr("hybrid.runtime.hardware.detect", lambda: hw)
    p = plan(k2, hw)
    assert p.context < SERVE_CONTEXT and p.gpu_precision == "bf16"
    assert (SERVE_CONTEXT + 64) * p.kv_bytes_per_token <= KV_SHARE * p.gpu_budget
    assert serve_sees(tiny_path, monkeypatch)["context"] == SERVE_CONTEXT == 32768
    assert plan(k2, hw, context=SERVE_CONTEXT).gpu_precision == "int8"
    assert serve_sees(tiny_path, monkeypatch, context=2048)["context"] == 2048
    # a 16 GB GPU: 32K's pages are over 10% of its budget, so the server takes the plan's choice
    monkeypatch.setattr("hybrid.runtime.hardware.detect", lambda: Hardware.hypothetical(128, [16]))
    assert serve_sees(tiny_path, monkeypatch)["context"] is None  # hybrid.load plans it: the plan's choice
    assert plan(k2, Hardware.hypothetical(128, [16])).context < SERVE_CONTEXT


def test_plan_assumes_the_context_the_engine_loads_with():
    """One default context, the plan's (hybrid.runtime.context): what `plan` projects is what run and chat load,
    and it says which and why in one line."""
    import inspect

    from hybrid.runtime.loader import load
    from hybrid.runtime.placement import plan

    assert LoadOptions().context is None
    assert {inspect.signature(f).parameters["context"].default for f in (load, plan)} == {None}
    for command in ("plan", "run", "chat", "bench", "serve"):  # no --context: None, the plan's choice
        args = ["hi"] if command == "run" else []
        assert main.commands[command].make_context(command, args).params["context"] is None
    r = CliRunner(env={"COLUMNS": "250"}).invoke(main, ["plan", "--ram-gb", "768", "--gpu-gb", "24", "--mem-gbps", "200"])
    # a 24 GB GPU: 22.5 GB of VRAM budget, 10% of it holds 16K tokens of K2's KV pages but not 32K
    assert r.exit_code == 0 and "KV cache (16,384 tokens," in r.output and "context 16,384;" in r.output, r.output
    assert "context 16,384 from the plan: its KV pages take 1.16 GB, 5.1% of the 22.50 GB VRAM budget; 32,768 " \
           "would take 2.31 GB, over 10% (--context sets it)" in r.output
    r = CliRunner(env={"COLUMNS": "250"}).invoke(main, ["plan", "--ram-gb", "768", "--gpu-gb", "24", "--mem-gbps", "200",
                                                        "--context", "8192", "--json"])
    got = json.loads(r.output)["plan"]
    assert (got["context"], got["context_why"]) == (8192, "context 8,192 as given (--context)")


def test_load_gives_the_engine_and_its_kv_store_the_plans_context(tiny_path):
    """hybrid.load without a context: the engine holds what the plan chose (the warm-up, chat's status line,
    bench and run read engine.context)."""
    engine = hybrid.load(tiny_path, backend="reference", decode_graphs="off")
    try:
        assert engine.context == engine.plan.context >= 4096 and engine.plan.context_why.startswith("context ")
        kv = engine.stats()["kv"]  # the pool the plan sized: the context and its copy-on-write page
        assert kv["pages"] * kv["page_size"] == engine.plan.kv_pool_tokens >= engine.context + 64
    finally:
        engine.close()


# ---- doctor ---------------------------------------------------------------------------------------

def test_doctor_reports_the_environment(tmp_path, monkeypatch):
    import torch

    from kernels_cpu.simd import host_features

    monkeypatch.setenv("KIMI_HYBRID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("OMP_PROC_BIND", raising=False)
    r = CliRunner().invoke(main, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    env = json.loads(r.stdout)
    assert env["torch"] == torch.__version__ and env["cpu_features"] == host_features()
    from kernels_cpu import amx
    assert env["amx"] == amx.available()  # AMX tiles for prompts: this CPU has them and Linux grants them
    assert env["numba_threading"].split(",")[0] in ("omp", "tbb", "workqueue")
    assert env["cuda"]["available"] == torch.cuda.is_available() and env["cache_dir"] == str(tmp_path / "cache")
    assert env["ram_gb"]["total"] > 0 and "hf download" in env["models"][REAL_MODEL]
    assert env["models"]["tiny"] == "not generated yet (made on first use)"
    assert env["ram_read_gbps"] > 0 and env["disk_read_gbps"] > 0  # measured (a 256 MB scratch file, deleted)
    assert list((tmp_path / "cache").glob("*")) == []
    r = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["doctor", "--no-measure"])
    assert r.exit_code == 0 and "threading layer" in r.output and "CPU kernels" in r.output
    assert "reads at" not in r.output and "OMP_PROC_BIND" not in r.output
    monkeypatch.setenv("OMP_PROC_BIND", "true")  # pins threads: doctor says to unset it
    r = CliRunner(env={"COLUMNS": "250"}).invoke(main, ["doctor", "--no-measure"])
    assert r.exit_code == 0 and "OMP_PROC_BIND=true is set: torch pins" in r.output and "unset it" in r.output


def test_doctor_shows_the_speeds_it_measured(monkeypatch):
    import hybrid.runtime.probe as probe  # doctor imports it when it measures

    monkeypatch.setattr(probe, "mem_read_gbps", lambda nbytes: 41.25)
    monkeypatch.setattr(probe, "disk_read_gbps", lambda directory, nbytes: 3.456)
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
        monkeypatch.setattr(loader, "load", lambda path, **kw: made.append(FakeEngine(events)) or made[-1])
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


# ---- serve: the port first, the warm-up before it opens ------------------------------------------------

def test_serve_names_a_port_in_use_before_loading(tiny_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("loaded before the port was checked")

    monkeypatch.setattr(loader, "load", no_load)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = CliRunner().invoke(main, ["serve", "-m", str(tiny_path), "--port", str(port)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"port {port} on 127.0.0.1 is already in use" in r.output and "--port" in r.output


def test_serve_holds_the_port_it_checked_and_serves_that_socket(tiny_path, monkeypatch):
    """Bound once, before the load, and served as is (#18: checking, then letting uvicorn bind again, left a gap):
    while the model loads another server cannot take the port, and the app answers on the socket checked."""
    import errno
    import threading

    import httpx
    import uvicorn

    import hybrid.serve.app as app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    real_load, answers = loader.load, []

    def load(*args, **kwargs):
        with socket.socket() as rival, pytest.raises(OSError) as taken:
            rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # binding as uvicorn would
            rival.bind(("127.0.0.1", port))
            rival.listen()
        assert taken.value.errno == errno.EADDRINUSE
        return real_load(*args, **kwargs)

    def serve_on(sock, asgi, host, log_level):  # uvicorn on that very socket, in a thread it can be stopped in
        assert sock.getsockname() == ("127.0.0.1", port)
        server = uvicorn.Server(uvicorn.Config(asgi, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            answers.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code)
        finally:
            server.should_exit = True
            thread.join(30)

    monkeypatch.setattr(loader, "load", load)
    monkeypatch.setattr(app, "serve_on", serve_on)
    app.serve(str(tiny_path), port=port, backend="reference", context=256)
    assert answers == [200]
    with socket.socket() as again:  # let go once the server has stopped
        again.bind(("127.0.0.1", port))


@pytest.mark.parametrize("cached, says", [(False, "compiling CPU kernels, first run only"), (True, "warming up")])
def test_serve_warms_the_engine_up_before_the_port_opens(tiny_path, monkeypatch, caplog, cached, says):
    import hybrid.runtime.warmup as runtime_warmup
    import hybrid.serve.app as app

    order = []
    monkeypatch.setattr(app, "kernels_cached", lambda: cached)
    monkeypatch.setattr(app, "warm_up", lambda engine: (order.append("warm-up"), runtime_warmup.warm_up(engine)))
    monkeypatch.setattr(app, "serve_on", lambda sock, asgi, **kw: order.append("port open"))
    with caplog.at_level(logging.INFO, logger="hybrid"):
        app.serve(str(tiny_path), port=9003, backend="reference", context=256)
    assert order == ["warm-up", "port open"]
    assert says in caplog.text
