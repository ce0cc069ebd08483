"""What a Python user and a load balancer meet first: Engine.complete (the non-streaming answer, equal to
the streaming chat's events) and /health, which answers without the API key while nothing else does."""
from __future__ import annotations

import httpx
import pytest

from hybrid.checkpoint.reader import Checkpoint
from hybrid.runtime.completion import Completion
from hybrid.serve.app import create_app
from hybrid.text.conversation import Done
from hybrid.text.parser import ContentDelta, ReasoningDelta, ToolCall, ToolCallError, assistant_message

from tests.server_harness import ANSWER, API_KEY, CALL_WEATHER, WEATHER_TOOL, ScriptedEngine, running

ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def engine(tiny_path):
    return ScriptedEngine(Checkpoint(tiny_path), context=1024)


def streamed(engine, script: str | None, **kw) -> tuple[list, Done]:
    if script is not None:
        engine.play(script)
    events = list(engine.chat(ASK, **kw))
    assert isinstance(events[-1], Done)
    return events[:-1], events[-1]


@pytest.mark.parametrize("script", [CALL_WEATHER, ANSWER])
def test_complete_is_the_streamed_chat_folded(engine, script):
    events, done = streamed(engine, script, tools=[WEATHER_TOOL], max_tokens=64)
    engine.play(script)
    c = engine.complete(ASK, tools=[WEATHER_TOOL], max_tokens=64)
    assert isinstance(c, Completion)
    assert c.reasoning == "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert c.content == "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert list(c.tool_calls) == [e for e in events if isinstance(e, ToolCall)]
    assert list(c.tool_call_errors) == [e for e in events if isinstance(e, ToolCallError)]
    assert c.finish_reason == done.finish_reason
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.reasoning_tokens) == \
        (done.prompt_tokens, done.completion_tokens, done.reasoning_tokens)
    assert c.message == assistant_message(events)  # ready for the next turn's messages


def test_complete_answers_the_scripted_turns(engine):
    engine.play(CALL_WEATHER)
    call = engine.complete(ASK, tools=[WEATHER_TOOL], max_tokens=64)
    assert call.finish_reason == "tool_calls" and call.reasoning == "I should check the weather."
    assert [(t.name, t.arguments) for t in call.tool_calls] == [("get_weather", '{"city":"Paris"}')]
    engine.play(ANSWER)
    answer = engine.complete(ASK + [call.message, {"role": "tool", "tool_call_id": call.tool_calls[0].id,
                                                   "content": "sunny"}], tools=[WEATHER_TOOL], max_tokens=64)
    assert (answer.content, answer.reasoning, answer.finish_reason) == ("It is sunny in Paris.",
                                                                        "The tool says sunny.", "stop")


def test_complete_on_the_model_itself_equals_the_stream(engine):
    """No script: the tiny model's own sampled answer, same seed, both ways."""
    events, done = streamed(engine, None, temperature=1.0, seed=7, max_tokens=12)
    c = engine.complete(ASK, temperature=1.0, seed=7, max_tokens=12)
    assert c.message == assistant_message(events) and c.usage.completion_tokens == done.completion_tokens == 12
    assert c.finish_reason == done.finish_reason == "length"
    with pytest.raises(ValueError, match="messages"):
        engine.complete([])


def test_health_needs_no_api_key_but_everything_else_does(engine):
    app = create_app(engine, api_key=API_KEY, model_name="kimi-test")
    with running(app) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert httpx.head(url + "/health").status_code != 401
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/health"),
                             ("GET", "/health/x"), ("GET", "/v1/models/kimi-test")):
            r = httpx.request(method, url + path, json={})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (method, path)
        ok = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200


def test_health_still_checks_the_host_header(engine):
    app = create_app(engine, model_name="kimi-test", allowed_hosts=("127.0.0.1", "localhost"))
    with running(app) as url:
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/health", headers={"Host": "evil.example"}).status_code == 403
