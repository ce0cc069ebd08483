"""/v1/messages through real HTTP on loopback, driven by the official `anthropic` client: thinking and
text blocks, a tool_use -> tool_result loop, streaming events in Anthropic's order, usage with cache
reads, stop sequences, and Anthropic-style errors. Scripted outputs as in test_server.py."""
from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from hybrid.checkpoint.reader import Checkpoint
from hybrid.serve.app import create_app

from tests.server_harness import ANSWER, API_KEY, CALL_WEATHER, HOLD_S, ScriptedEngine, running

MODEL = "kimi-test"
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def engine(tiny_path):
    return ScriptedEngine(Checkpoint(tiny_path), context=1024)


@pytest.fixture(scope="module")
def base_url(engine):
    with running(create_app(engine, api_key=API_KEY, model_name=MODEL, max_prompt_tokens=400)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    with anthropic.Anthropic(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=HOLD_S) as c:
        yield c


def create(client, messages, **kw):
    kw.setdefault("max_tokens", 200)
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return client.messages.create(model=MODEL, messages=messages, extra_body={"temperature": 0}, **kw)


def test_thinking_and_text_blocks(client, engine):
    engine.play("<think>Paris is in France.</think>The capital is Paris.<|im_end|>")
    m = create(client, "Capital of France?", system="Be brief.")
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in m.content] == \
        [("thinking", "Paris is in France."), ("text", "The capital is Paris.")]
    assert (m.stop_reason, m.stop_sequence, m.model, m.role) == ("end_turn", None, MODEL, "assistant")
    prompt = engine.decode_prompt()
    assert prompt.startswith("<|im_system|>system<|im_middle|>Be brief.<|im_end|>")
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(engine.prompts[-1])
    assert m.usage.output_tokens == len(engine.tokenizer.encode(
        "<think>Paris is in France.</think>The capital is Paris.<|im_end|>", allow_special=True))


def test_thinking_disabled_hides_the_thinking_block(client, engine):
    engine.play("<think>secret</think>Hi.<|im_end|>")
    m = create(client, "hi", thinking={"type": "disabled"})
    assert [b.type for b in m.content] == ["text"]


def test_tool_use_loop(client, engine):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    engine.play(CALL_WEATHER)
    m = create(client, messages, tools=[WEATHER])
    assert m.stop_reason == "tool_use"
    thinking, call = m.content
    assert thinking.thinking == "I should check the weather."
    assert (call.type, call.id, call.name, call.input) == ("tool_use", "functions.get_weather:0", "get_weather",
                                                           {"city": "Paris"})
    messages += [{"role": "assistant", "content": m.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}]
    engine.play(ANSWER)
    m = create(client, messages, tools=[WEATHER])
    assert (m.stop_reason, [b.type for b in m.content], m.content[-1].text) == \
        ("end_turn", ["thinking", "text"], "It is sunny in Paris.")
    prompt = engine.decode_prompt()
    assert "<think>I should check the weather.</think><|tool_calls_section_begin|><|tool_call_begin|>" \
           "functions.get_weather:0<|tool_call_argument_begin|>" in prompt
    assert "## Return of functions.get_weather:0\nsunny<|im_end|><|im_assistant|>assistant<|im_middle|>" in prompt


def test_tool_choice_tool_makes_the_answer_that_call(client, engine):
    """A named tool choice starts the answer as that call (reasoning closed), so only the input is written;
    the call's index follows the conversation's earlier calls."""
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "functions.get_weather:0",
                                                   "name": "get_weather", "input": {"city": "Rome"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "functions.get_weather:0",
                                              "content": "rain"}, {"type": "text", "text": "And Paris?"}]}]
    engine.play('{"city":"Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
    m = create(client, messages, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    assert m.stop_reason == "tool_use"
    assert [(b.type, b.id, b.name, b.input) for b in m.content if b.type == "tool_use"] == \
        [("tool_use", "functions.get_weather:1", "get_weather", {"city": "Paris"})]
    assert engine.decode_prompt().endswith("<think></think><|tool_calls_section_begin|><|tool_call_begin|>"
                                           "functions.get_weather:1<|tool_call_argument_begin|>")


def test_streaming_events_come_in_anthropic_order(client, engine):
    engine.play(CALL_WEATHER.replace("</think>", "</think>Let me look."))
    events = list(client.messages.create(model=MODEL, max_tokens=200, stream=True, tools=[WEATHER],
                                         messages=[{"role": "user", "content": "Weather in Paris?"}]))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    blocks, open_index = [], None
    for e in events[1:-2]:  # each block: start, deltas, stop; indexes 0, 1, 2 in turn
        if e.type == "content_block_start":
            assert open_index is None and e.index == len(blocks)
            open_index = e.index
            blocks.append([e.content_block.type, ""])
        elif e.type == "content_block_delta":
            assert e.index == open_index
            blocks[-1][1] += getattr(e.delta, "thinking", None) or getattr(e.delta, "text", None) or e.delta.partial_json
        else:
            assert e.type == "content_block_stop" and e.index == open_index
            open_index = None
    assert open_index is None
    assert blocks == [["thinking", "I should check the weather."], ["text", "Let me look."],
                      ["tool_use", '{"city": "Paris"}']]
    assert events[-2].delta.stop_reason == "tool_use" and events[-2].usage.output_tokens > 0
    assert events[0].message.usage.input_tokens + events[0].message.usage.cache_read_input_tokens == \
        len(engine.prompts[-1])


def test_streamed_real_model_accumulates(client):
    # greedy: at the default temperature the tiny random model drew </think> first now and then (no seed in
    # Anthropic's API), and the answer opened with a text block
    with client.messages.stream(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hello"}],
                                extra_body={"temperature": 0}) as s:
        final = s.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].thinking
    assert final.stop_reason in ("max_tokens", "end_turn") and final.usage.output_tokens >= 1


def test_stop_sequence_is_reported(client, engine):
    engine.play("<think>ok</think>one two END three<|im_end|>")
    m = create(client, "count", stop_sequences=["END", "never"])
    assert (m.content[-1].text, m.stop_reason, m.stop_sequence) == ("one two ", "stop_sequence", "END")
    engine.play("<think>ok</think>one two three<|im_end|>")
    assert create(client, "count", max_tokens=3).stop_reason == "max_tokens"


def test_count_tokens(client, engine):
    messages = [{"role": "user", "content": "How many tokens is this?"}]
    counted = client.messages.count_tokens(model=MODEL, messages=messages, system="sys")
    expected = engine.apply_chat_template([{"role": "system", "content": "sys"}, *messages], tokenize=True)
    assert counted.input_tokens == len(expected)


@pytest.mark.parametrize("body, status, kind, needle", [
    (b"{oops", 400, "invalid_request_error", "not valid JSON"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request_error", "max_tokens"),
    ({"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}, 404, "not_found_error",
     "claude-x"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     400, "invalid_request_error", "image"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "stop_sequences": [""]},
     400, "invalid_request_error", "stop_sequences"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "word " * 500}]}, 400,
     "invalid_request_error", "400"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "assistant", "content": "prefill"}]}, 400,
     "invalid_request_error", "prefill"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
      "tool_choice": {"type": "tool"}}, 400, "invalid_request_error", "needs that tool's name"),
])
def test_invalid_requests_get_anthropic_errors(base_url, body, status, kind, needle):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(base_url + "/v1/messages", content=raw, headers={"x-api-key": API_KEY})
    assert r.status_code == status, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == kind
    assert needle in r.json()["error"]["message"]


def test_wrong_api_key_is_401(base_url):
    with anthropic.Anthropic(base_url=base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as exc:
            bad.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert exc.value.body["error"]["type"] == "authentication_error"


def test_interleaved_conversations_report_their_cache_reads(client):
    """Two conversations taking turns: each turn's cache_read_input_tokens covers that conversation's
    whole previous prompt, although the other ran in between."""
    convs = [[{"role": "user", "content": "Tell me about the sea, in detail please."}],
             [{"role": "user", "content": "Name three birds that live near rivers."}]]
    last = [None, None]
    for turn in range(3):
        for c, messages in enumerate(convs):
            m = create(client, messages, max_tokens=4)
            total = m.usage.input_tokens + m.usage.cache_read_input_tokens
            if last[c] is not None:
                assert m.usage.cache_read_input_tokens >= last[c], (turn, c)
            last[c] = total
            text = "".join(getattr(b, "text", "") or "" for b in m.content) or "ok"
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"Go on ({turn})."}]
