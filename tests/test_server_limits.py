"""What one request may cost the server: a prompt too long to fit is refused before it is tokenized (a
sound byte bound), the request bytes held at once are bounded across requests (429 beyond), and a
refused client is told a Retry-After that grows with the queue and the measured job time."""
from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid.checkpoint.reader import Checkpoint
from hybrid.model.sampling import SamplingParams
from hybrid.serve.app import create_app
from hybrid.serve.common import longest_token_bytes, utf8_len
from hybrid.serve.runner import EngineRunner, Failed, Finished, Job, QueueFull

from tests.server_harness import API_KEY, HOLD_S, ScriptedEngine, running, watching_submissions

MODEL = "kimi-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def engine(tiny_path):
    return ScriptedEngine(Checkpoint(tiny_path), context=1024)


def chat(content: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


# ---- a prompt too long to fit is refused before tokenizing -----------------------------------------

def test_a_prompt_too_long_to_fit_is_refused_without_tokenizing_it(engine, monkeypatch):
    calls = []
    encode_chat = engine.tokenizer.encode_chat
    monkeypatch.setattr(engine.tokenizer, "encode_chat", lambda text: calls.append(len(text)) or encode_chat(text))
    app = create_app(engine, api_key=API_KEY, model_name=MODEL, max_body_bytes=8 << 20)
    with running(app) as url:
        r = httpx.post(url + "/v1/chat/completions", json=chat("word " * 400_000), headers=AUTH, timeout=HOLD_S)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert "at least" in r.json()["error"]["message"]
        assert calls == []  # 2 MB of text, never tokenized
        r = httpx.post(url + "/v1/messages", json=chat("word " * 400_000), headers=AUTH, timeout=HOLD_S)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error" and calls == []
        # over the limit in tokens but not by the byte bound: tokenized, then refused with the exact count
        r = httpx.post(url + "/v1/chat/completions", json=chat("word " * 1500), headers=AUTH, timeout=HOLD_S)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert len(calls) == 1 and "at least" not in r.json()["error"]["message"]
        # the longest prompt that fits passes the byte bound: 1023 tokens of the 1024 context
        fits = fitting_prompt(engine, limit=1023)
        engine.play("ok<|im_end|>")
        r = httpx.post(url + "/v1/chat/completions", json=chat(fits), headers=AUTH, timeout=HOLD_S)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 1023, r.text


def fitting_prompt(engine, limit: int) -> str:
    """User text whose chat prompt is exactly `limit` tokens."""
    base = len(engine.chat_prompt([{"role": "user", "content": ""}]))
    text = "a" * (limit - base)  # the tiny BPE has no merge of 'aa': one token per letter
    assert len(engine.chat_prompt([{"role": "user", "content": text}])) == limit
    return text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_a_text_is_at_least_its_bytes_over_the_longest_token_in_tokens(engine, text):
    """The bound prepare() refuses by: no tokenization packs more than longest_token_bytes bytes into a token."""
    tok = engine.tokenizer
    longest = longest_token_bytes(tok)
    assert len(tok.encode(text, allow_special=True)) * longest >= utf8_len(text)
    assert len(tok.encode_chat(text)) * longest >= utf8_len(text)


def test_utf8_len_counts_like_encode():
    for text in ("", "ascii", "é" * 3, "日本語", "\U0001f600x", "\ud800", "a" * (3 << 20) + "é"):
        assert utf8_len(text) == len(text.encode("utf-8", "surrogatepass"))


# ---- the request bytes held at once -------------------------------------------------------------------

async def call(app, body: bytes, gate: asyncio.Event | None = None, split: int = 0,
               arrived: asyncio.Event | None = None) -> tuple[int, dict]:
    """One POST straight through the ASGI app; with a gate, the body's first `split` bytes arrive (then
    `arrived` is set), the rest only once the gate opens: a slow upload."""
    parts = [body[:split], body[split:]] if gate is not None else [body]
    sent: list[dict] = []

    async def receive() -> dict:
        if not parts:
            await asyncio.Event().wait()  # connected until the response is done
        if gate is not None and len(parts) == 1:
            await gate.wait()
        if arrived is not None:
            arrived.set()  # the app counts these bytes before this task yields again
        return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {**json.loads(data), "headers": dict(start["headers"])}


def test_request_bytes_held_at_once_are_bounded(engine):
    """A slow 12 KB upload holds 8 KB; another 6 KB body would pass the 10 KB budget: 429 with Retry-After.
    Once the first is answered its bytes are free again; a request alone may use more than the budget."""
    app = create_app(engine, model_name=MODEL, max_body_bytes=64 << 10, max_pending_bytes=10_000)
    wrong_model = json.dumps({"model": "other", "messages": [{"role": "user", "content": "x" * 12_000}]}).encode()
    small = json.dumps({"model": "other", "messages": [{"role": "user", "content": "y" * 6_000}]}).encode()

    async def scenario() -> list:
        gate, arrived = asyncio.Event(), asyncio.Event()
        slow = asyncio.ensure_future(call(app, wrong_model, gate, split=8_000, arrived=arrived))
        await arrived.wait()
        refused = await call(app, small)
        gate.set()
        first = await slow
        after = await call(app, small)
        alone = await call(app, wrong_model)
        return [refused, first, after, alone]

    (status, body), first, after, alone = asyncio.run(scenario())
    assert status == 429 and body["error"]["code"] == "too_many_pending_bytes", body
    assert body["headers"][b"retry-after"] == b"1"
    assert first[0] == after[0] == alone[0] == 404  # read in full, then refused for the model it names


def test_prompts_are_tokenized_two_at_a_time(engine, monkeypatch):
    """Tokenizing is CPU-bound and takes ~20 bytes of memory per byte of text: of four requests at once,
    two are tokenized together (they meet at a barrier of two), never three (a barrier of three breaks)."""
    two, three = threading.Barrier(2, timeout=HOLD_S), threading.Barrier(3, timeout=1.0)
    met, chat_prompt = [], engine.chat_prompt

    def tokenize(*args, **kwargs):
        two.wait()
        try:
            three.wait()
            met.append(3)
        except threading.BrokenBarrierError:  # the expected way out: no third one came meanwhile
            pass
        return chat_prompt(*args, **kwargs)

    monkeypatch.setattr(engine, "chat_prompt", tokenize)
    app = create_app(engine, api_key=API_KEY, model_name=MODEL)
    with running(app) as url, ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(httpx.post, url + "/v1/chat/completions", json=chat(f"q{i}", max_tokens=1),
                               headers=AUTH, timeout=HOLD_S) for i in range(4)]
        assert [a.result(HOLD_S).status_code for a in answers] == [200] * 4
    assert met == []


# ---- Retry-After grows with the queue --------------------------------------------------------------

def refusals(max_queue: int, n: int, clock=lambda: 0.0) -> list[int]:
    """Retry-After of n clients refused one after another by a full queue (no job has run yet: 2 s each)."""
    async def run() -> list[int]:
        runner = EngineRunner(None, max_queue, clock=clock)  # not started: the line stays as submitted
        for _ in range(max_queue + 1):
            runner.submit(Job([1], SamplingParams(), None, 1))
        out = []
        for _ in range(n):
            with pytest.raises(QueueFull) as full:
                runner.submit(Job([1], SamplingParams(), None, 1))
            out.append(full.value.retry_after_s)
        return out

    return asyncio.run(run())


def test_retry_after_grows_with_the_queue_and_spreads_a_burst():
    # the line ahead drains at 2 s a job; each full group of refused clients still due back adds a queue's worth
    assert refusals(1, 6) == [2, 2, 6, 6, 10, 10]
    assert refusals(4, 11) == [8] * 5 + [18] * 5 + [28]
    assert refusals(16, 1) == [32] and refusals(40, 1) == [60]  # capped where clients still honour it


def test_retry_after_forgets_clients_once_they_are_due_back():
    now = [0.0]
    runner = EngineRunner(None, 1, clock=lambda: now[0])

    async def refuse() -> int:
        with pytest.raises(QueueFull) as full:
            runner.submit(Job([1], SamplingParams(), None, 1))
        return full.value.retry_after_s

    async def run() -> list[int]:
        runner.submit(Job([1], SamplingParams(), None, 1))
        runner.submit(Job([1], SamplingParams(), None, 1))
        first = [await refuse() for _ in range(3)]
        now[0] = 100.0  # all of them were due back long ago
        return first + [await refuse()]

    assert asyncio.run(run()) == [2, 2, 6, 2]


class _WorkerFirst(threading.Event):
    """A queued job's cancel flag that loses the race to the worker: when shutdown() cancels the job, it
    first releases the running job and waits until the worker has taken this one out of line."""

    def __init__(self, hold: threading.Event, taken: threading.Event):
        super().__init__()
        self.hold, self.taken = hold, taken

    def set(self) -> None:
        self.hold.set()
        assert self.taken.wait(HOLD_S), "the worker never reached the queued job"
        super().set()


def test_a_job_the_worker_skips_during_shutdown_still_gets_the_503(engine):
    """shutdown() answers the jobs in line while the worker may reach one first (skipping it because the
    runner is stopping): that job's consumer must see the same 503 'shutting_down', not an answer that
    just stops (the server then said 'cancelled', a flaky failure of the SIGTERM test)."""
    runner = EngineRunner(engine, None)
    runner.start()
    hold = threading.Event()

    async def run() -> list:
        engine.play("<think>busy", hold=hold)
        running = runner.submit(Job([1, 2, 3], SamplingParams(temperature=0), None, 8))
        assert await asyncio.to_thread(engine.started.wait, HOLD_S)
        queued = Job([1, 2, 3], SamplingParams(temperature=0), None, 8)
        queued.cancelled = _WorkerFirst(hold, queued.finished)
        runner.submit(queued)
        runner.shutdown()
        [i async for i in runner.events(running)]
        return [i async for i in runner.events(queued)]

    try:
        items = asyncio.run(run())
    finally:
        hold.set()
        runner.stop()
    assert len(items) == 1 and isinstance(items[0], Failed), items
    assert (items[0].status, items[0].code) == (503, "shutting_down") and "not started" in items[0].message


def test_retry_after_follows_the_measured_job_time(engine):
    """One job took 5 s (by the runner's clock): two waiting jobs mean about 10 s."""
    ticks = iter([0.0, 5.0])
    runner = EngineRunner(engine, 2, clock=lambda: next(ticks, 5.0))
    runner.start()
    hold = threading.Event()

    async def run() -> int:
        engine.play("done<|im_end|>")
        job = runner.submit(Job([1, 2, 3], SamplingParams(temperature=0), None, 8))
        assert isinstance([i async for i in runner.events(job)][-1], Finished)
        engine.play("<think>busy", hold=hold)
        jobs = [runner.submit(Job([1, 2, 3], SamplingParams(temperature=0), None, n)) for n in (20, 4, 4)]
        try:
            with pytest.raises(QueueFull) as full:
                runner.submit(Job([1], SamplingParams(), None, 1))
        finally:
            hold.set()
        for j in jobs:
            [i async for i in runner.events(j)]
        return full.value.retry_after_s

    try:
        assert asyncio.run(run()) == 10
    finally:
        hold.set()
        runner.stop()


def test_clients_see_the_estimate_in_the_retry_after_header(engine):
    app = create_app(engine, api_key=API_KEY, model_name=MODEL, max_queue=2)
    hold = threading.Event()
    engine.play("<think>busy", hold=hold)
    with running(app) as url, watching_submissions() as seen, ThreadPoolExecutor(3) as pool:
        line = [pool.submit(httpx.post, url + "/v1/chat/completions", json=chat("q", max_tokens=20), headers=AUTH,
                            timeout=HOLD_S)]  # held after its script: running until the hold is set
        assert seen.wait_for(1) and engine.started.wait(HOLD_S)
        line += [pool.submit(httpx.post, url + "/v1/chat/completions", json=chat("q"), headers=AUTH, timeout=HOLD_S)
                 for _ in range(2)]
        assert seen.wait_for(3)
        try:
            waits = []
            for _ in range(4):
                r = httpx.post(url + "/v1/messages", json=chat("q"), headers=AUTH, timeout=HOLD_S)
                assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
                waits.append(r.headers["retry-after"])
        finally:
            hold.set()
        assert all(f.result(HOLD_S).status_code == 200 for f in line)
    assert waits == ["4", "4", "4", "10"]  # 2 s a job, 2 waiting; the 4th refused waits for the first 3


def test_serve_takes_the_byte_limits_from_the_command_line(tiny_path, monkeypatch):
    from click.testing import CliRunner

    import hybrid.serve.app
    from hybrid.cli.main import main

    seen: dict = {}
    monkeypatch.setattr(hybrid.serve.app, "serve", lambda model, **kw: seen.update(kw))
    r = CliRunner().invoke(main, ["serve", "-m", str(tiny_path), "--max-body-bytes", "1000", "--max-pending-bytes", "5000"])
    assert r.exit_code == 0, r.output
    assert seen["max_body_bytes"] == 1000 and seen["max_pending_bytes"] == 5000
    seen.clear()
    assert CliRunner().invoke(main, ["serve", "-m", str(tiny_path)]).exit_code == 0
    assert "max_body_bytes" not in seen and "max_pending_bytes" not in seen  # serve() keeps its defaults
