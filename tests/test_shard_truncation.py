"""A checkpoint shard truncated or deleted under a loaded model (issue #15): the request in flight gets a
clear error naming the shard instead of the process dying of SIGBUS, the model is then unusable with
that reason, and /health says so (503). The SIGBUS cases run in a subprocess, so a regression kills it,
not pytest."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

import hybrid
from hybrid.checkpoint.reader import Checkpoint, CheckpointError
from hybrid.serve.app import create_app
from kernels_cpu.simd import host_has_avx2
from tests.server_harness import API_KEY, HOLD_S, ScriptedEngine, running

ROOT = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = list(range(5, 40))

# Shared by both modes: load the copy, find an MoE layer's shard (its experts are read every token)
# and whether this process holds a read lease on it (/proc/locks names leases by inode).
PRELUDE = """
import os, sys, threading, time
from pathlib import Path
import hybrid
from hybrid.checkpoint.reader import CheckpointError

path = Path(sys.argv[1])
shard = sorted(path.glob("model-0000[2-9]-*.safetensors"))[0]
PROMPT = list(range(5, 40))

def leased():
    ino = f":{os.stat(shard).st_ino} "
    return any(line.split()[1] == "LEASE" and ino in line for line in open("/proc/locks"))

def unusable_afterwards(e):
    for use in (lambda: list(e.generate(PROMPT, 2, temperature=0)), lambda: e.logits(PROMPT)):
        try:
            use()
            raise AssertionError("a request ran on a model whose shard was truncated")
        except CheckpointError as err:
            assert "the model is unusable" in str(err) and shard.name in str(err), err
    assert shard.name in e.health(), e.health()
"""

# The generation runs in a worker thread (as in the server) while the main thread truncates the shard:
# the truncation waits on the lease until the engine stopped at a safe point.
LEASED = PRELUDE + """
e = hybrid.load(path, backend="numba", expert_mode="mmap")
assert leased(), "no read lease on the shard"
tokens, errors, running = [], [], threading.Event()

def generate():
    try:
        for step in e.generate(PROMPT, 3000, temperature=0):
            tokens.append(step.token)
            if len(tokens) == 3:
                running.set()
    except Exception as err:
        errors.append(err)
    running.set()

worker = threading.Thread(target=generate)
worker.start()
assert running.wait(120)
t0 = time.perf_counter()
os.truncate(shard, 1000)
waited = time.perf_counter() - t0
worker.join(120)
assert waited < 20, f"the writer waited {waited:.1f} s: the lease was not given back, the kernel broke it"
assert not worker.is_alive()
assert os.path.getsize(shard) == 1000 and 3 <= len(tokens) < 3000, (os.path.getsize(shard), len(tokens))
assert len(errors) == 1 and isinstance(errors[0], CheckpointError), errors
message = str(errors[0])
assert shard.name in message and "load it again" in message, message
assert not leased()
unusable_afterwards(e)
print(f"OK truncation waited {waited:.2f} s; tokens before the error: {len(tokens)}; {message}")
"""

# The same during a long prefill, in chunks: the truncation is noticed between two chunks, before
# any token (should_stop is asked between chunks: the first ask says the prefill is under way).
PREFILL = PRELUDE + """
e = hybrid.load(path, backend="numba", expert_mode="mmap", prefill_chunk=2)
assert leased(), "no read lease on the shard"
tokens, errors, prefilling = [], [], threading.Event()

def generate():
    try:
        for step in e.generate([5 + i % 500 for i in range(3000)], 4, temperature=0,
                               should_stop=lambda: prefilling.set() or False):
            tokens.append(step.token)
    except Exception as err:
        errors.append(err)
    prefilling.set()

worker = threading.Thread(target=generate)
worker.start()
assert prefilling.wait(120)
os.truncate(shard, 1000)
worker.join(120)
assert not tokens and len(errors) == 1 and isinstance(errors[0], CheckpointError), (tokens, errors)
assert shard.name in str(errors[0]) and "load it again" in str(errors[0]), errors[0]
unusable_afterwards(e)
print(f"OK {errors[0]}")
"""

# A writer has the shard open, so no lease can be had: the per-step size check must stop the next
# step. The truncation happens between two steps (the consumer's turn), where that check is exact.
UNLEASED = PRELUDE + """
writer = open(shard, "r+b")
e = hybrid.load(path, backend="numba", expert_mode="mmap")
assert not leased(), "a lease despite a writer"
g = e.generate(PROMPT, 50, temperature=0)
next(g), next(g)
os.ftruncate(writer.fileno(), 1000)
try:
    next(g)
    raise AssertionError("a step ran over a truncated shard")
except CheckpointError as err:
    message = str(err)
assert shard.name in message and "shrank" in message and "load it again" in message, message
writer.close()
unusable_afterwards(e)
print(f"OK {message}")
"""


def run_script(script: str, ckpt: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(ckpt)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def ckpt_copy(tiny_path, tmp_path) -> Path:
    """A copy of the tiny checkpoint: the tests truncate and delete its shards."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_path, path)
    return path


needs_numba = pytest.mark.skipif(not host_has_avx2(), reason="the Numba INT4 kernels need AVX2 + FMA")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read leases are Linux's")


@needs_numba
@linux_only
@pytest.mark.parametrize("script", [LEASED, PREFILL, UNLEASED], ids=["leased", "prefill", "unleased"])
def test_a_shard_truncated_during_a_request_is_an_error_not_sigbus(ckpt_copy, script):
    done = run_script(script, ckpt_copy)
    assert done.returncode == 0 and "OK" in done.stdout, \
        f"exit {done.returncode} (-7 is SIGBUS)\n{done.stdout}\n{done.stderr[-3000:]}"


@needs_numba
@linux_only
def test_an_idle_engine_lets_a_writer_go_at_once_and_checks_the_shard_again(ckpt_copy):
    """Idle, nothing reads the shards: the lease is given back within a poll, the model stays usable,
    and the next request checks the shard's size first (an error while short, fine once restored)."""
    e = hybrid.load(ckpt_copy, backend="numba", expert_mode="mmap")
    reference = [s.token for s in e.generate(PROMPT, 3, temperature=0)]
    shard = sorted(ckpt_copy.glob("model-0000[2-9]-*.safetensors"))[0]
    saved = shard.read_bytes()
    t0 = time.perf_counter()
    os.truncate(shard, 1000)
    assert time.perf_counter() - t0 < 20, "the lease was not given back: the kernel broke it"
    assert shard.name in e.health() and "shrank" in e.health()
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard shrank"):
        list(e.generate(PROMPT + [7], 3, temperature=0))
    shard.write_bytes(saved)
    assert e.health() is None
    assert [s.token for s in e.generate(PROMPT, 3, temperature=0)] == reference
    e.close()


def test_health_reports_a_deleted_shard_and_requests_name_it(ckpt_copy):
    engine = ScriptedEngine(Checkpoint(ckpt_copy), context=1024)
    shard = sorted(ckpt_copy.glob("model-0000[2-9]-*.safetensors"))[0]
    with running(create_app(engine, api_key=API_KEY, model_name="m")) as url:
        ok = httpx.get(url + "/health", headers=AUTH, timeout=HOLD_S)
        assert ok.status_code == 200 and ok.json()["status"] == "ok" and "reason" not in ok.json()
        shard.unlink()
        sick = httpx.get(url + "/health", headers=AUTH, timeout=HOLD_S)
        assert sick.status_code == 503, sick.text
        body = sick.json()
        assert body["status"] == "unusable" and shard.name in body["reason"] and "vanished" in body["reason"]
        r = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=HOLD_S,
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code >= 500 and shard.name in r.text
        assert httpx.get(url + "/health", headers=AUTH, timeout=HOLD_S).status_code == 503
    engine.close()
