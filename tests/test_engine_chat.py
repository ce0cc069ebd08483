"""Engine chat: template -> tokens -> generation -> parsed events, stop handling, and KV prefix reuse."""
from __future__ import annotations

import pytest
import torch

import hybrid
from hybrid.text.conversation import Done
from hybrid.text.parser import ContentDelta, ReasoningDelta, assistant_message


@pytest.fixture(scope="module")
def engine(tiny_path):
    return hybrid.load(tiny_path, context=512)


def collect(engine, msgs, **kw):
    events = list(engine.chat(msgs, **kw))
    assert isinstance(events[-1], Done)
    return events[:-1], events[-1]


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_second_turn_prefills_only_new_tokens_and_matches_fresh_logits(engine, tiny_path):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt1 = engine.apply_chat_template(msgs, tokenize=True)
    events, done = collect(engine, msgs, temperature=0, max_tokens=6)
    assert done.prefill_tokens == len(prompt1)  # only the first request's shared prefix was cached before
    generated = engine._kv.held[len(prompt1):]  # the answer's tokens the cache holds
    turn2 = msgs + [assistant_message(events), {"role": "user", "content": "And of Italy?"}]
    prompt2 = engine.apply_chat_template(turn2, tokenize=True)
    held = prompt1 + generated
    expect_reused = common_prefix(held, prompt2)
    assert expect_reused >= len(prompt1) - 8  # the history re-renders identically up to the last turn

    seen = []
    steps = list(engine.generate(prompt2, 1, sampler=lambda lg: seen.append(lg.clone()) or int(lg.argmax())))
    assert steps[0].prefill_tokens == len(prompt2) - expect_reused < len(prompt2) // 2

    fresh = hybrid.load(tiny_path, context=512)
    ref = []
    list(fresh.generate(prompt2, 1, sampler=lambda lg: ref.append(lg.clone()) or int(lg.argmax())))
    assert torch.allclose(seen[0], ref[0], rtol=0, atol=1e-4 * float(ref[0].abs().max()))


def test_greedy_chat_is_deterministic_and_streams_what_a_whole_parse_gives(engine):
    from hybrid.text.parser import coalesce, parse_output

    msgs = [{"role": "user", "content": "hi"}]
    a, da = collect(engine, msgs, temperature=0, max_tokens=10)
    b, db = collect(engine, msgs, temperature=0, max_tokens=10)
    assert a == b and da.completion_tokens == db.completion_tokens
    assert da.finish_reason in ("stop", "length") and da.completion_tokens <= 10
    assert db.prefill_tokens == 1  # the identical prompt is reused but for its last token
    # independently: generate the same tokens, decode them whole, parse the whole text at once
    ids = engine.apply_chat_template(msgs, tokenize=True)
    steps = list(engine.generate(ids, 10, temperature=0))
    text = engine.tokenizer.decode([s.token for s in steps if s.finish != "stop"])
    assert coalesce(a) == parse_output(text)


def test_seeded_sampling_reproducible(engine):
    msgs = [{"role": "user", "content": "tell me a story"}]
    a, _ = collect(engine, msgs, temperature=1.0, seed=7, max_tokens=8)
    b, _ = collect(engine, msgs, temperature=1.0, seed=7, max_tokens=8)
    c, _ = collect(engine, msgs, temperature=1.0, seed=8, max_tokens=8)
    assert a == b
    assert a != c  # the seed really drives the draws


def test_prompt_over_context_is_refused(engine):
    with pytest.raises(ValueError, match="context is 512"):
        list(engine.generate(list(range(600)), 1))


def test_special_strings_in_user_text_stay_text(engine):
    msgs = [{"role": "user", "content": "say <|im_end|> now"}]
    ids = engine.apply_chat_template(msgs, tokenize=True)
    assert ids.count(engine.tokenizer.im_end_id) == 2  # the system and user turns' own ends, not the user's text
    assert "<|im_end|> now" in engine.tokenizer.decode(ids)


def test_stop_string_ends_the_answer(engine):
    msgs = [{"role": "user", "content": "hi"}]
    events, done = collect(engine, msgs, temperature=0, max_tokens=12)
    text = "".join(e.text for e in events if isinstance(e, (ReasoningDelta, ContentDelta)))
    stop = text[4:6]
    cut, done2 = collect(engine, msgs, temperature=0, max_tokens=12, stop=[stop])
    got = "".join(e.text for e in cut if isinstance(e, (ReasoningDelta, ContentDelta)))
    assert done2.finish_reason == "stop" and got == text[:text.find(stop)]


@pytest.mark.parametrize("messages, says", [
    ([], "non-empty list"),
    ([{"content": "hi"}], r"messages\[0\] needs a \"role\""),
    ([{"role": "wizard", "content": "hi"}], r"messages\[0\] needs a \"role\""),
    ([{"role": "user"}], r"messages\[0\] \(user\) needs a \"content\""),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}], r"messages\[1\] \(tool\) needs the"),
    ([{"role": "user", "content": 5}], "not text"),
    ([{"role": "user", "content": ["hi"]}], "content part 0"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "content part 0"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": "x"}], r"messages\[1\]: \"tool_calls\""),
])
def test_malformed_messages_are_refused_naming_the_message(scripted, messages, says):
    """The template would render these into a wrong prompt (a missing role as a system turn, a tool
    result without its call id) rather than fail: Engine.chat refuses them first, as the CLI and
    the server do, before anything runs."""
    n = len(scripted.prompts)
    with pytest.raises(ValueError, match=says):
        list(scripted.chat(messages))
    assert len(scripted.prompts) == n


def test_malformed_tools_are_refused(scripted):
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"tools\[0\] \(f\): function.parameters"):
        list(scripted.chat(hi, tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]))
    with pytest.raises(ValueError, match=r"messages: message 0 is not a dict"):
        list(scripted.chat(["hi"]))


def test_what_the_server_accepts_engine_chat_accepts(scripted):
    """A developer message is a system message (as the OpenAI server maps it); tuples, dataclasses and
    pydantic models are messages too, and a named tool_choice works on them."""
    import dataclasses

    from pydantic import BaseModel

    from tests.server_harness import WEATHER_TOOL

    def prompt_of(messages, **kw):
        list(scripted.chat(messages, **kw))
        return scripted.prompts[-1]

    system = prompt_of([{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}])
    assert prompt_of([{"role": "developer", "content": "be terse"}, {"role": "user", "content": "hi"}]) == system
    assert prompt_of(({"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"})) == system

    @dataclasses.dataclass
    class Msg:
        role: str
        content: str

    class PMsg(BaseModel):
        role: str
        content: str

    assert prompt_of([Msg("system", "be terse"), PMsg(role="user", content="hi")]) == system
    named = prompt_of([{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL], tool_choice="get_weather")
    assert prompt_of([PMsg(role="user", content="weather?")], tools=(WEATHER_TOOL,), tool_choice="get_weather") == named


@pytest.fixture(scope="module")
def scripted(tiny_path):
    from hybrid.checkpoint.reader import Checkpoint

    from tests.server_harness import ScriptedEngine

    return ScriptedEngine(Checkpoint(tiny_path), context=512)


def test_tool_choice_named_required_and_none(scripted):
    """Engine.chat's tool_choice, as the server's: a named call or 'required' starts the assistant's
    turn with K2's call prefix (the prompt ends with it, the parser reads it first), 'none' leaves the
    tools undeclared. ScriptedEngine writes only what the model would write after the prefix."""
    from hybrid.text.parser import ToolCall

    from tests.server_harness import WEATHER_TOOL

    tools = [WEATHER_TOOL]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    scripted.play('{"city":"Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
    for choice in ("get_weather", {"type": "function", "function": {"name": "get_weather"}}):
        if choice != "get_weather":
            scripted.play('{"city":"Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
        events, done = collect(scripted, msgs, tools=tools, tool_choice=choice, temperature=0)
        assert events == [ToolCall("functions.get_weather:0", "get_weather", '{"city":"Paris"}')]
        assert done.finish_reason == "tool_calls"
        assert scripted.decode_prompt().endswith("<think></think><|tool_calls_section_begin|><|tool_call_begin|>"
                                                 "functions.get_weather:0<|tool_call_argument_begin|>")
    scripted.play('get_weather:0<|tool_call_argument_begin|>{"city":"Oslo"}<|tool_call_end|>'
                  "<|tool_calls_section_end|><|im_end|>")
    events, done = collect(scripted, msgs, tools=tools, tool_choice="required", temperature=0)
    assert events == [ToolCall("functions.get_weather:0", "get_weather", '{"city":"Oslo"}')]
    assert scripted.decode_prompt().endswith("<|tool_call_begin|>functions.")
    scripted.play("<think>No tool needed.</think>No tools today.<|im_end|>")
    events, done = collect(scripted, msgs, tools=tools, tool_choice="none", temperature=0)
    assert "get_weather" not in scripted.decode_prompt() and done.finish_reason == "stop"
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "No tools today."
    for auto in ("auto", None):  # the tools are declared, nothing forced
        scripted.play("Plain.<|im_end|>")
        collect(scripted, msgs, tools=tools, tool_choice=auto, temperature=0)
        assert "get_weather" in scripted.decode_prompt()
        assert scripted.decode_prompt().endswith("<|im_assistant|>assistant<|im_middle|>")


def test_tool_choice_limits_which_calls_the_parser_accepts(scripted):
    """A named choice accepts calls of that tool only (a second call of another declared tool is an
    error event), and 'none' accepts none; 'required' accepts any declared tool."""
    from hybrid.text.parser import ToolCall, ToolCallError

    from tests.server_harness import WEATHER_TOOL

    time_tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    tools, msgs = [WEATHER_TOOL, time_tool], [{"role": "user", "content": "Weather and time in Paris?"}]
    second = ('<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{}<|tool_call_end|>'
              "<|tool_calls_section_end|><|im_end|>")
    for choice, want in (("get_weather", ToolCallError), ("required", ToolCall)):
        head = "" if choice == "get_weather" else "get_weather:0<|tool_call_argument_begin|>"
        scripted.play(head + '{"city":"Paris"}<|tool_call_end|>' + second)
        events, _ = collect(scripted, msgs, tools=tools, tool_choice=choice, temperature=0)
        assert isinstance(events[0], ToolCall) and events[0].name == "get_weather"
        assert len(events) == 2 and isinstance(events[1], want)
    scripted.play("<think>x</think><|tool_calls_section_begin|>" + second)
    events, _ = collect(scripted, msgs, tools=tools, tool_choice="none", temperature=0)
    assert [type(e) for e in events if not isinstance(e, ReasoningDelta)] == [ToolCallError]


@pytest.mark.parametrize("choice,tools,match", [
    ("get_time", [None], "not among the tools"),
    ("required", None, "no tools were given"),
    ({"type": "function"}, [None], "must look like"),
    ({"type": "function", "function": {"name": "none"}}, [None], "not among the tools"),  # a name, not the keyword
    (3, [None], "tool_choice must be"),
    ("f<|im_end|>", [None], "letters, digits"),  # a forced name is control text: no special tokens in it
])
def test_tool_choice_errors_name_the_problem(scripted, choice, tools, match):
    from tests.server_harness import WEATHER_TOOL

    tools = [WEATHER_TOOL] if tools else None
    if choice == "f<|im_end|>":
        tools.append({"type": "function", "function": {"name": choice, "parameters": {"type": "object"}}})
    n = len(scripted.prompts)
    with pytest.raises(ValueError, match=match):
        list(scripted.chat([{"role": "user", "content": "hi"}], tools=tools, tool_choice=choice))
    assert len(scripted.prompts) == n  # refused before anything ran


@pytest.mark.parametrize("bad", [{"type": "function", "function": {}}, {"type": "function"}, "get_weather",
                                 {"type": "function", "function": {"name": ""}}])
def test_a_malformed_tool_is_a_clear_error(scripted, bad):
    from tests.server_harness import WEATHER_TOOL

    n = len(scripted.prompts)
    with pytest.raises(ValueError, match=r"tools\[1\]( must be an object|: function.name must be)"):
        list(scripted.chat([{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL, bad]))
    assert len(scripted.prompts) == n


def test_chat_refuses_a_tool_reply_to_no_call(engine):
    """Engine.chat holds tool messages to OpenAI's rule, as the servers do: each answers a call of the
    assistant message before it, by id."""
    with pytest.raises(ValueError, match=r"messages\[1\]: messages with role 'tool' must be a response"):
        list(engine.chat([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c1", "content": "x"}]))
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with pytest.raises(ValueError, match=r"'tool_call_id' of 'c2' not found"):
        list(engine.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "c2", "content": "x"}]))
