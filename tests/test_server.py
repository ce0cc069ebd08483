"""The server through real HTTP on loopback, driven by the official `openai` client (and raw httpx for
malformed requests): answers with reasoning, a tool loop, queueing, cancellation, prefix reuse, errors.
The tiny checkpoint has random weights, so scripted outputs (tests/server_harness.py) stand in for a
model that calls tools; everything after generate() is the real path."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from hybrid.serve.common import ApiError, collect
from hybrid.checkpoint.reader import Checkpoint
from hybrid.serve.runner import Job
from hybrid.model.sampling import SamplingParams
from hybrid.serve.app import create_app

from tests.server_harness import (ANSWER, API_KEY, CALL_WEATHER, HOLD_S, WEATHER_TOOL, ScriptedEngine, raw_post, running,
                             watching_submissions)

MODEL = "kimi-test"
MAX_PROMPT = 400
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def engine(tiny_path):
    return ScriptedEngine(Checkpoint(tiny_path), context=1024)


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, api_key=API_KEY, model_name=MODEL, max_body_bytes=MAX_BODY, max_prompt_tokens=MAX_PROMPT,
                      allowed_hosts=("127.0.0.1", "localhost"))


@pytest.fixture(scope="module")
def base_url(app):
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=HOLD_S) as c:
        yield c


def ask(client, content, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(base_url + "/health", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_scripted_answer_splits_reasoning_from_content(client, engine):
    engine.play("<think>Paris is in France.</think>The capital is Paris.<|im_end|>")
    r = ask(client, "Capital of France?", max_tokens=100)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content, msg.tool_calls) == ("Paris is in France.", "The capital is Paris.", None)
    assert r.choices[0].finish_reason == "stop"
    script = engine.tokenizer.encode("<think>Paris is in France.</think>The capital is Paris.<|im_end|>", allow_special=True)
    assert r.usage.completion_tokens == len(script)
    assert r.usage.prompt_tokens == len(engine.prompts[-1])


def test_real_model_streams_what_it_answers(client):
    plain = ask(client, "hello there", max_tokens=12)
    chunks = list(ask(client, "hello there", max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == plain.choices[0].message.reasoning_content and reasoning  # greedy: the same tokens
    assert content == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == plain.usage.completion_tokens
    assert usage.completion_tokens_details.reasoning_tokens == plain.usage.completion_tokens_details.reasoning_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_tool_loop(client, engine):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    engine.play(CALL_WEATHER)
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=200)
    msg, finish = r.choices[0].message, r.choices[0].finish_reason
    assert finish == "tool_calls" and msg.reasoning_content == "I should check the weather."
    (call,) = msg.tool_calls
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == \
        ("functions.get_weather:0", "get_weather", {"city": "Paris"})
    assert "tool_declare" in engine.decode_prompt()

    messages += [msg.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
    engine.play(ANSWER)
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=200)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("It is sunny in Paris.", "stop")
    prompt = engine.decode_prompt()  # the current tool loop keeps its reasoning; the call comes back verbatim
    assert "<think>I should check the weather.</think><|tool_calls_section_begin|><|tool_call_begin|>functions." \
           'get_weather:0<|tool_call_argument_begin|>{"city":"Paris"}<|tool_call_end|>' in prompt
    assert "## Return of functions.get_weather:0\nsunny, 24 C<|im_end|>" in prompt


def test_streamed_tool_call_deltas(client, engine):
    engine.play(CALL_WEATHER)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                                 tools=[WEATHER_TOOL], stream=True, max_tokens=200))
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert [(tc.index, tc.id, tc.function.name, tc.function.arguments) for tc in calls] == \
        [(0, "functions.get_weather:0", "get_weather", '{"city":"Paris"}')]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_named(client, engine):
    engine.play(CALL_WEATHER)
    r = ask(client, "Paris?", tools=[WEATHER_TOOL], tool_choice="none", max_tokens=200)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert "<|tool_call_begin|>" in r.choices[0].message.content  # the stray call comes back as text
    assert "tool_declare" not in engine.decode_prompt()
    # a named function: the answer starts as that call, so the model only writes the arguments
    engine.play('{"city":"Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = ask(client, "Paris?", tools=[WEATHER_TOOL], tool_choice=named, max_tokens=200)
    assert r.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls] == \
        [("functions.get_weather:0", "get_weather", '{"city":"Paris"}')]
    assert engine.decode_prompt().endswith("<|im_assistant|>assistant<|im_middle|><think></think>"
                                           "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
                                           "<|tool_call_argument_begin|>")
    # 'required': the tool section is opened and the model names the tool
    engine.play('get_weather:0<|tool_call_argument_begin|>{"city":"Oslo"}<|tool_call_end|>'
                "<|tool_calls_section_end|><|im_end|>")
    r = ask(client, "Oslo?", tools=[WEATHER_TOOL], tool_choice="required", max_tokens=200)
    assert r.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls] == \
        [("get_weather", '{"city":"Oslo"}')]


def test_stop_string_and_length(client, engine):
    engine.play("<think>ok</think>Hello STOP world<|im_end|>")
    r = ask(client, "hi", stop=["STOP"], max_tokens=100)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Hello ", "stop")
    engine.play("<think>ok</think>Hello world<|im_end|>")
    r = ask(client, "hi", max_completion_tokens=3)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 3)


def test_growing_conversation_prefills_only_the_new_tokens(client):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
    messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "And rivers?"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
    cached = second.usage.prompt_tokens_details.cached_tokens
    new = second.usage.prompt_tokens - first.usage.prompt_tokens
    assert cached >= first.usage.prompt_tokens  # the whole first prompt came from the KV cache
    assert 0 < second.usage.prompt_tokens - cached <= new
    again = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1  # logits of the last


def test_interleaved_conversations_each_find_their_own_prefix(client):
    """Two conversations taking turns (an agent and its sub-agent): each turn's cached_tokens counts that
    conversation's whole previous prompt, although the other conversation ran in between."""
    convs = [[{"role": "user", "content": "Tell me about the sea, in detail please."}],
             [{"role": "user", "content": "Name three birds that live near rivers."}]]
    last = [None, None]
    for turn in range(3):
        for c, messages in enumerate(convs):
            r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
            if last[c] is not None:
                assert r.usage.prompt_tokens_details.cached_tokens >= last[c].usage.prompt_tokens, (turn, c)
            last[c] = r
            messages += [r.choices[0].message.model_dump(exclude_none=True),
                         {"role": "user", "content": f"Go on ({turn})."}]


def test_eight_clients_queue_in_order_and_all_complete(client, engine, app):
    hold = threading.Event()
    engine.play("<think>busy", hold=hold)  # keeps the engine busy until all eight are queued
    with watching_submissions() as seen, ThreadPoolExecutor(9) as pool:
        blocker = pool.submit(ask, client, "first", max_tokens=20)
        assert seen.wait_for(1)
        futures = [pool.submit(ask, client, f"question {i}", max_tokens=5, stream=False) for i in range(8)]
        assert seen.wait_for(9)
        hold.set()
        results = [f.result(timeout=HOLD_S) for f in futures]
        assert blocker.result(timeout=HOLD_S).choices[0].finish_reason == "length"
    assert sorted(seen.positions()) == list(range(1, 10))  # one running, eight waiting
    assert all(r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1 for r in results)
    started = [m.split()[1] for m in seen.records if "queue position" in m]  # "request ID: ..."
    finished = [m.split()[1] for m in seen.records if "prefilled" in m]
    assert finished == started  # first in, first out


def test_client_leaving_mid_stream_frees_the_engine(client, engine, app):
    runner = app.state.server.runner
    hold, cancelled_before = threading.Event(), runner.cancelled
    engine.play("<think>a long line of thought", hold=hold)
    stream = ask(client, "think long", stream=True, max_tokens=900)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    job = runner.active
    stream.close()  # the client hangs up while the engine is mid-answer
    assert job.cancelled.wait(HOLD_S)  # the server noticed the disconnect
    hold.set()  # the engine finishes the token it was computing...
    assert engine.closed.wait(HOLD_S) and job.finished.wait(HOLD_S)  # ...and the generation is closed after it
    assert engine.last_steps < 900 and runner.cancelled == cancelled_before + 1
    r = ask(client, "next")  # the next request runs at once
    assert r.choices[0].finish_reason in ("stop", "length")


def test_leaving_clients_of_plain_and_queued_requests_cancel_them(base_url, client, engine, app):
    runner = app.state.server.runner
    hold, cancelled_before = threading.Event(), runner.cancelled
    engine.play("<think>working", hold=hold)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "wait"}], "max_tokens": 900}
    with watching_submissions() as seen:
        running_client = raw_post(base_url, "/v1/chat/completions", body)
        assert engine.started.wait(HOLD_S)
        job = runner.active
        queued_client = raw_post(base_url, "/v1/chat/completions", body)
        assert seen.wait_for(2)
        prompts = len(engine.prompts)
        queued_client.close()
        running_client.close()
        assert seen.wait_for(2, "the client disconnected") and job.cancelled.is_set()
        hold.set()
        assert job.finished.wait(HOLD_S) and engine.last_steps < 900
        # logged as the client's cancel, not as the server stopping
        assert seen.wait_for(2, "499 for POST /v1/chat/completions: the client disconnected before the answer")
        assert not [m for m in seen.records if "shutting down" in m]
    assert ask(client, "after").choices[0].finish_reason in ("stop", "length")
    assert runner.cancelled == cancelled_before + 2
    assert len(engine.prompts) == prompts + 1  # the queued request never reached the engine


def test_a_job_the_stopping_runner_drops_is_a_503_and_one_whose_client_left_a_499():
    class Client:
        def __init__(self, leaves: bool):
            self.leaves = leaves

        async def receive(self) -> dict:
            if not self.leaves:
                await asyncio.Event().wait()  # connected until cancelled
            return {"type": "http.disconnect"}

    class StoppingRunner:  # ends every job without an answer, as EngineRunner.stop() does
        async def events(self, job):
            await asyncio.sleep(0.05)  # the disconnect watcher gets its turn first
            return
            yield

    def status(leaves: bool) -> tuple[int, str]:
        job = Job([1], SamplingParams(), None, 1)
        with pytest.raises(ApiError) as e:
            asyncio.run(collect(Client(leaves), StoppingRunner(), job))
        return e.value.status, e.value.message

    assert status(leaves=False) == (503, "the request was cancelled: the server is shutting down")
    code, message = status(leaves=True)
    assert code == 499 and "the client disconnected" in message


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_json"),
    ({"model": MODEL}, 400, "messages", None),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", None),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", None),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0]", None),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 10}}, 400, "logit_bias",
     "unsupported_value"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages[0].content", "missing_required_parameter"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400, "tool_choice", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 500}]}, 400, "messages", "context_length_exceeded"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 1)}]}, 413, None, "request_too_large"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {
        "name": "f", "parameters": json.loads('{"a":' * 150 + "1" + "}" * 150)}}]}, 400, None, "invalid_json"),
])
def test_invalid_requests_get_openai_errors(base_url, body, status, param, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(base_url + "/v1/chat/completions", content=raw,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and (code is None or err["code"] == code)
    if code == "context_length_exceeded":
        assert str(MAX_PROMPT) in err["message"]


def test_wrong_or_missing_api_key_is_401(base_url):
    with openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = httpx.post(base_url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_a_failing_generation_is_a_500_or_an_error_event_and_the_server_goes_on(client, engine):
    engine.play("<think>so far", fail=RuntimeError("the GPU fell off"))
    with pytest.raises(openai.InternalServerError, match="the GPU fell off"):
        ask(client, "hi")
    engine.play("<think>so far", fail=RuntimeError("the GPU fell off again"))
    with pytest.raises(openai.APIError, match="fell off again"):
        list(ask(client, "hi", stream=True))
    assert ask(client, "and now?").choices[0].finish_reason in ("stop", "length")


def test_other_hosts_and_non_json_posts_are_refused(base_url):
    # a page that rebinds its own DNS name to 127.0.0.1 sends its name as Host; browsers' simple posts are not JSON
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.get(base_url + "/v1/models", headers={**auth, "Host": "evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(base_url + "/v1/models", headers={**auth, "Host": "localhost:1234"}).status_code == 200
    r = httpx.post(base_url + "/v1/chat/completions", content=b'{"model": "x"}', headers={**auth, "Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]


def test_server_survives_everything_above(client, app):
    assert app.state.server.runner.active is None and app.state.server.runner.waiting == 0
    assert ask(client, "still there?").choices[0].finish_reason in ("stop", "length")


def test_serve_binds_loopback_checks_host_and_stops_on_ctrl_c(tiny_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"from hybrid.serve.app import serve; serve({str(tiny_path)!r}, port={port}, backend='reference', "
            "context=256, model_name='m')")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(2 * HOLD_S, proc.kill)  # a hung server ends the reads below
    watchdog.start()
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "Uvicorn running on" in line:
                break
        assert f"http://127.0.0.1:{port}" in lines[-1], "".join(lines)
        with openai.OpenAI(base_url=f"http://localhost:{port}/v1", api_key="none", max_retries=0) as c:
            r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens <= 3
        # no key on loopback: only requests addressed to loopback names are answered
        r = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Host": f"rebound.example:{port}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
        proc.send_signal(signal.SIGINT)
        log = "".join(lines) + proc.stderr.read()
        assert proc.wait(HOLD_S) == 0, log
        assert "queue position 1" in log
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()


def test_serve_builds_the_app_with_its_options(tiny_path, monkeypatch):
    """serve() hands keepalive_s, max_queue and the model name to the app it runs, and closes the engine."""
    import hybrid.serve.app as serve_app

    seen = {}
    monkeypatch.setattr(serve_app, "serve_on", lambda sock, app, **kw: seen.update(kw, app=app, at=sock.getsockname()))
    serve_app.serve(str(tiny_path), port=9002, backend="reference", context=256, model_name="m", keepalive_s=7.5,
                    max_queue=3)
    state = seen["app"].state.server
    assert seen["at"] == ("127.0.0.1", 9002) and seen["host"] == "127.0.0.1"
    assert state.keepalive_s == 7.5 and state.runner.max_queue == 3 and state.model_name == "m"
    assert state.engine.context == 256


def test_a_full_queue_answers_429_with_retry_after_in_both_apis(engine):
    """max_queue=1: one request runs, one waits, the third is refused at once (OpenAI and Anthropic
    clients both see their rate-limit error, with Retry-After); once the line moves, requests run again."""
    import anthropic

    app = create_app(engine, api_key=API_KEY, model_name=MODEL, max_queue=1)
    hold = threading.Event()
    engine.play("<think>busy", hold=hold)
    with running(app) as url, watching_submissions() as seen, ThreadPoolExecutor(2) as pool, \
            openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=HOLD_S) as oa, \
            anthropic.Anthropic(base_url=url, api_key=API_KEY, max_retries=0, timeout=HOLD_S) as an:
        blocker = pool.submit(ask, oa, "first", max_tokens=20)
        assert seen.wait_for(1) and engine.started.wait(HOLD_S)
        waiting = pool.submit(ask, oa, "second", max_tokens=3)
        assert seen.wait_for(2)
        with pytest.raises(openai.RateLimitError) as refused:
            ask(oa, "third")
        assert refused.value.response.headers["retry-after"] == "2"  # nothing finished yet: the default
        assert refused.value.body["code"] == "queue_full" and "max_queue=1" in refused.value.body["message"]
        with pytest.raises(anthropic.RateLimitError) as refused_an:
            an.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "third"}])
        assert refused_an.value.response.headers["retry-after"] == "2"
        assert refused_an.value.body["error"]["type"] == "rate_limit_error"
        health = httpx.get(url + "/health", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert health["waiting"] == 1 and health["max_queue"] == 1 and health["busy"]
        hold.set()
        assert blocker.result(timeout=HOLD_S).choices[0].finish_reason == "length"
        assert waiting.result(timeout=HOLD_S).usage.completion_tokens >= 1
        assert ask(oa, "fourth").choices[0].finish_reason in ("stop", "length")
    assert sum("queue position" in m for m in seen.records) == 3  # refusals never entered the queue


def test_queued_streams_get_keepalive_comments_and_still_parse(engine):
    """A streamed request waiting behind another gets SSE comments every keepalive_s (raw bytes show
    them before any data), and the official OpenAI and Anthropic clients parse such streams as usual."""
    import anthropic

    app = create_app(engine, api_key=API_KEY, model_name=MODEL, keepalive_s=0.05)
    hold = threading.Event()
    engine.play("<think>busy", hold=hold)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "queued"}], "max_tokens": 4, "stream": True}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with running(app) as url, ThreadPoolExecutor(1) as pool, \
            openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=HOLD_S) as oa:
        blocker = pool.submit(ask, oa, "first", max_tokens=20)
        assert engine.started.wait(HOLD_S)
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth, timeout=HOLD_S) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(2)]  # nothing else can come while the engine is held
            assert first[0] == ": keep-alive" and first[1] == ""
            hold.set()
            rest = list(lines)
        data = [ln for ln in rest if ln.startswith("data: ")]
        assert data[-1] == "data: [DONE]" and len(data) >= 3
        assert blocker.result(timeout=HOLD_S).choices[0].finish_reason == "length"
        hold = threading.Event()
        engine.play("<think>busy", hold=hold)
        blocker = pool.submit(ask, oa, "again", max_tokens=20)
        assert engine.started.wait(HOLD_S)
        got: dict = {}

        def openai_stream() -> None:
            chunks = list(oa.chat.completions.create(model=MODEL, stream=True, max_tokens=4, temperature=0,
                                                     messages=[{"role": "user", "content": "queued too"}]))
            got["openai"] = chunks[-1].choices[0].finish_reason

        def anthropic_stream() -> None:
            with anthropic.Anthropic(base_url=url, api_key=API_KEY, max_retries=0, timeout=HOLD_S) as an:
                # greedy, as the OpenAI stream beside it: a sampled token ended the turn first once (CI at c852ecc:
                # end_turn after 3 tokens). This SDK's stream() takes no temperature argument: the body carries it.
                with an.messages.stream(model=MODEL, max_tokens=4, extra_body={"temperature": 0},
                                        messages=[{"role": "user", "content": "queued as well"}]) as s:
                    got["anthropic"] = s.get_final_message().stop_reason

        with watching_submissions() as seen, ThreadPoolExecutor(2) as clients:
            futures = [clients.submit(openai_stream), clients.submit(anthropic_stream)]
            assert seen.wait_for(2)  # both queued behind the held one, their streams open and ticking
            hold.set()
            for f in futures:
                f.result(timeout=HOLD_S)
        assert got == {"openai": "length", "anthropic": "max_tokens"}
        assert blocker.result(timeout=HOLD_S).choices[0].finish_reason == "length"


def test_a_queued_client_that_left_frees_its_place(engine):
    """max_queue counts the clients still waiting: one that hung up while queued (its job is skipped
    when its turn comes) does not make the next request a 429."""
    app = create_app(engine, api_key=API_KEY, model_name=MODEL, max_queue=1)
    hold = threading.Event()
    engine.play("<think>busy", hold=hold)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "queued, then gone"}], "max_tokens": 3}
    with running(app) as url, watching_submissions() as seen, ThreadPoolExecutor(2) as pool, \
            openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=HOLD_S) as oa:
        blocker = pool.submit(ask, oa, "first", max_tokens=20)
        assert seen.wait_for(1) and engine.started.wait(HOLD_S)
        gone = raw_post(url, "/v1/chat/completions", body)
        assert seen.wait_for(2)
        gone.close()
        assert seen.wait_for(1, "the client disconnected")
        health = httpx.get(url + "/health", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert health["waiting"] == 0 and health["busy"]  # /health counts as the 429 rule does
        later = pool.submit(ask, oa, "next in line", max_tokens=3)
        assert seen.wait_for(3)  # queued, not refused
        hold.set()
        assert later.result(timeout=HOLD_S).usage.completion_tokens >= 1
        assert blocker.result(timeout=HOLD_S).choices[0].finish_reason == "length"


def test_retry_after_follows_the_average_request_time():
    from hybrid.serve.runner import RETRY_AFTER_DEFAULT_S, RETRY_AFTER_MAX_S, EngineRunner

    runner = EngineRunner(engine=None, max_queue=0)
    assert runner.retry_after_s() == RETRY_AFTER_DEFAULT_S  # nothing finished yet
    for job_s, want in ((0.2, 1), (7.2, 8), (500.0, RETRY_AFTER_MAX_S)):
        runner._job_s = job_s
        assert runner.retry_after_s() == want
    with pytest.raises(ValueError, match="max_queue"):
        EngineRunner(engine=None, max_queue=-1)


def test_a_job_whose_client_left_stops_its_prefill_between_chunks(engine):
    """The runner hands engine.generate its job's cancel flag: a client that leaves during a long
    prefill stops it at the next chunk, not after the whole prompt."""
    from hybrid.runtime.engine import PREFILL_CHUNK
    from hybrid.serve.runner import EngineRunner, Finished

    runner = EngineRunner(engine)
    runner.start()
    prompt = engine.apply_chat_template([{"role": "user", "content": "a long story about chunks " * 8}], tokenize=True)
    jobs, sizes, real = [], [], engine.model.forward

    def forward(ids, cache, **kw):
        sizes.append(len(ids))
        jobs[0].cancel()  # the client leaves while the first chunk is computed
        return real(ids, cache, **kw)

    async def run() -> list:
        jobs.append(runner.submit(Job(prompt, SamplingParams(temperature=0), None, 16)))
        return [item async for item in runner.events(jobs[0])]

    engine.prefill_chunk, engine.model.forward = 8, forward
    try:
        items = asyncio.run(run())
    finally:
        engine.prefill_chunk = PREFILL_CHUNK
        del engine.model.forward
        runner.stop()
    assert len(sizes) == 1 and sizes[0] == 8  # one chunk ran; the prompt had many more
    assert len(prompt) > 40 and not any(isinstance(i, Finished) for i in items) and runner.cancelled == 1


def test_max_queue_holds_for_a_burst_at_an_idle_worker(engine):
    """Submissions that arrive together, before the worker has picked any up, count against max_queue:
    one of them will run, max_queue may wait, the rest are refused."""
    from hybrid.serve.runner import EngineRunner, QueueFull

    async def burst(max_queue: int) -> int:
        runner = EngineRunner(engine, max_queue)  # not started: nothing is taken off the queue meanwhile
        accepted = 0
        for i in range(4):
            try:
                runner.submit(Job([1, 2, 3], SamplingParams(temperature=0), None, 1))
                accepted += 1
            except QueueFull as full:
                assert full.waiting == max_queue
        return accepted

    assert asyncio.run(burst(0)) == 1 and asyncio.run(burst(1)) == 2


def test_a_lost_expert_node_fails_its_request_with_503(engine):
    """A cluster node lost mid-request (hybrid.cluster raises a ConnectionError naming it) ends that
    request as a 503 'node_lost', not a 500: the head goes on, computing the node's experts itself."""
    from hybrid.serve.runner import EngineRunner, Failed

    runner = EngineRunner(engine)
    runner.start()
    prompt = engine.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)

    def forward(ids, cache, **kw):
        raise ConnectionError("expert node 1 (127.0.0.1:29400) stopped answering")

    async def run() -> list:
        job = runner.submit(Job(prompt, SamplingParams(temperature=0), None, 4))
        return [item async for item in runner.events(job)]

    engine.model.forward = forward
    try:
        items = asyncio.run(run())
    finally:
        del engine.model.forward
        runner.stop()
    failed = [i for i in items if isinstance(i, Failed)]
    assert len(failed) == 1 and (failed[0].status, failed[0].code) == (503, "node_lost")
    assert "expert node 1" in failed[0].message
