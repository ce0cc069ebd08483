"""The servers refuse what the official APIs refuse (issue #15): a tool message or tool_result that answers
no earlier call, and scalars of the wrong JSON type ("5", true or 5.0 for an integer, a string or a
boolean for a number, a string or a number for a boolean), each a 400 that names the field. Through raw
HTTP and the official `openai` / `anthropic` clients, which pass such values on unchecked."""
from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from hybrid.checkpoint.reader import Checkpoint
from hybrid.serve.app import create_app
from hybrid.text.conversation import ToolReplyError, check_tool_replies

from tests.server_harness import API_KEY, HOLD_S, ScriptedEngine, running

MODEL = "kimi-test"
OK = "<think></think>ok<|im_end|>"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine(tiny_path):
    return ScriptedEngine(Checkpoint(tiny_path), context=1024)


@pytest.fixture(scope="module")
def base_url(engine):
    with running(create_app(engine, api_key=API_KEY, model_name=MODEL)) as url:
        yield url


def post(base_url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(base_url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=HOLD_S)


# ---- tool replies -----------------------------------------------------------------------------------

def _calls(*ids: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in ids]}


def _reply(call_id: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": "done"}


@pytest.mark.parametrize("messages, param, needle", [
    ([*HI, _reply("call_1")], "messages[1].role", "must be a response to a preceding message with 'tool_calls'"),
    ([_reply("call_1")], "messages[0].role", "must be a response"),
    ([*HI, {"role": "assistant", "content": "sure"}, _reply("call_1")], "messages[2].role", "must be a response"),
    ([*HI, _calls("call_1"), _reply("call_1"), *HI, _reply("call_1")], "messages[4].role", "must be a response"),
    ([*HI, _calls("call_1"), _reply("call_2")], "messages[2].tool_call_id", "'call_2' not found in 'tool_calls'"),
])
def test_openai_refuses_a_tool_message_that_answers_no_call(base_url, messages, param, needle):
    r = post(base_url, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 4})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"]) == ("invalid_request_error", param)
    assert needle in err["message"] and param.split(".")[0] in err["message"]


def test_openai_client_sees_the_refusal_and_answered_calls_pass(base_url, engine):
    with openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=HOLD_S) as client:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=[*HI, _reply("call_9")], max_tokens=4)
        assert exc.value.body["param"] == "messages[1].role"
        engine.play(OK)
        ok = client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            *HI, _calls("call_1", "call_2"), _reply("call_2"), _reply("call_1"), *HI])
    assert ok.choices[0].message.content == "ok"


def test_check_tool_replies_is_the_one_rule():
    check_tool_replies([*HI, _calls("a", "b"), _reply("b"), _reply("a"), *HI, _calls("c"), _reply("c")])
    with pytest.raises(ToolReplyError) as exc:
        check_tool_replies([{"role": "system", "content": "s"}, _calls("a"), {"role": "system", "content": "s"},
                            _reply("a")])
    assert (exc.value.index, exc.value.field) == (3, "role")


def _use(use_id: str) -> dict:
    return {"role": "assistant", "content": [{"type": "tool_use", "id": use_id, "name": "f", "input": {}}]}


def _result(use_id: str, text: str = "") -> dict:
    content = [{"type": "tool_result", "tool_use_id": use_id, "content": "done"}]
    return {"role": "user", "content": content + ([{"type": "text", "text": text}] if text else [])}


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@pytest.mark.parametrize("messages, where, use_id", [
    ([_result("toolu_1")], "messages[0].content[0]", "toolu_1"),
    ([*HI, {"role": "assistant", "content": "sure"}, _result("toolu_1")], "messages[2].content[0]", "toolu_1"),
    ([*HI, _use("toolu_1"), _result("toolu_2")], "messages[2].content[0]", "toolu_2"),
    ([*HI, _use("toolu_1"), _result("toolu_1", "more"), {"role": "assistant", "content": "ok"}, _result("toolu_1")],
     "messages[4].content[0]", "toolu_1"),
])
def test_anthropic_refuses_a_tool_result_that_answers_no_tool_use(base_url, path, messages, where, use_id):
    r = post(base_url, path, {"model": MODEL, "max_tokens": 4, "messages": messages})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    message = r.json()["error"]["message"]
    assert message.startswith(f"{where}: unexpected `tool_use_id`") and use_id in message


def test_anthropic_client_sees_the_refusal_and_answered_uses_pass(base_url, engine):
    with anthropic.Anthropic(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=HOLD_S) as client:
        with pytest.raises(anthropic.BadRequestError) as exc:
            client.messages.create(model=MODEL, max_tokens=4, messages=[_result("toolu_9")])
        assert "toolu_9" in exc.value.body["error"]["message"]
        engine.play(OK)
        ok = client.messages.create(model=MODEL, max_tokens=4, messages=[*HI, _use("toolu_1"), _result("toolu_1")])
    assert [b.text for b in ok.content if b.type == "text"] == ["ok"]


# ---- strict scalar types ----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, expected, got", [
    ("max_tokens", "5", "an integer", "a string"),
    ("max_tokens", True, "an integer", "a boolean"),
    ("max_tokens", 5.0, "an integer", "a decimal number"),
    ("max_completion_tokens", "5", "an integer", "a string"),
    ("n", True, "an integer", "a boolean"),
    ("seed", 1.5, "an integer", "a decimal number"),
    ("top_logprobs", "2", "an integer", "a string"),
    ("temperature", "0.5", "a number", "a string"),
    ("temperature", False, "a number", "a boolean"),
    ("top_p", True, "a number", "a boolean"),
    ("presence_penalty", "0", "a number", "a string"),
    ("stream", "true", "a boolean", "a string"),
    ("stream", 1, "a boolean", "an integer"),
    ("logprobs", 0, "a boolean", "an integer"),
    ("parallel_tool_calls", "false", "a boolean", "a string"),
    ("stream_options.include_usage", "yes", "a boolean", "a string"),
])
def test_openai_refuses_scalars_of_the_wrong_type(base_url, field, value, expected, got):
    body = {"model": MODEL, "messages": HI}
    *outer, name = field.split(".")
    (body.setdefault(outer[0], {}) if outer else body)[name] = value
    r = post(base_url, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": f"Invalid type for '{field}': expected {expected}, but got {got} instead.",
                                 "type": "invalid_request_error", "param": field, "code": "invalid_type"}


def test_openai_client_values_pass_through_and_are_refused(base_url, engine):
    with openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=HOLD_S) as client:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens="5")
        assert exc.value.body["param"] == "max_tokens"
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=HI, extra_body={"n": True})
        assert exc.value.body["param"] == "n"
        engine.play(OK)  # integers are numbers; nulls are absent values
        ok = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, temperature=1, top_p=1, seed=0,
                                            n=1, stream=False, logprobs=False, extra_body={"stream": None})
    assert ok.choices[0].message.content == "ok"


@pytest.mark.parametrize("field, value, needle", [
    ("max_tokens", "5", "valid integer"),
    ("max_tokens", True, "valid integer"),
    ("max_tokens", 5.0, "valid integer"),
    ("temperature", "1", "valid number"),
    ("temperature", True, "valid number"),
    ("top_p", False, "valid number"),
    ("top_k", "5", "valid integer"),
    ("top_k", 2.0, "valid integer"),
    ("stream", "true", "valid boolean"),
    ("stream", 1, "valid boolean"),
    ("stop_sequences", "END", "valid list"),
    ("stop_sequences", [1], "valid string"),
])
def test_anthropic_refuses_scalars_of_the_wrong_type(base_url, field, value, needle):
    body = {"model": MODEL, "max_tokens": 4, "messages": HI, field: value}
    r = post(base_url, "/v1/messages", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"].startswith(f"{field}") and needle in err["message"]


def test_anthropic_client_values_pass_through_and_are_refused(base_url, engine):
    with anthropic.Anthropic(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=HOLD_S) as client:
        with pytest.raises(anthropic.BadRequestError) as exc:
            client.messages.create(model=MODEL, max_tokens="5", messages=HI)
        assert exc.value.body["error"]["message"].startswith("max_tokens")
        with pytest.raises(anthropic.BadRequestError) as exc:
            client.messages.create(model=MODEL, max_tokens=5, messages=HI, extra_body={"top_k": True})
        assert exc.value.body["error"]["message"].startswith("top_k")
        engine.play(OK)
        ok = client.messages.create(model=MODEL, max_tokens=5, messages=HI,
                                    extra_body={"temperature": 1, "top_p": 1, "top_k": 5})  # not in this client's create()
    assert [b.text for b in ok.content if b.type == "text"] == ["ok"]
