"""Output parser: the K2 grammar at every split point, malformed calls as error events, never raising."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid.text.template import load_chat_template, render_chat
from hybrid.text.parser import (
    ARG_BEGIN,
    CALL_BEGIN,
    CALL_END,
    IM_END,
    SECTION_BEGIN,
    SECTION_END,
    ContentDelta,
    OutputParser,
    ReasoningDelta,
    ToolCall,
    ToolCallError,
    assistant_message,
    coalesce,
    parse_output,
)

R, C = ReasoningDelta, ContentDelta


def call(idx, name, args):
    return f"{CALL_BEGIN}functions.{name}:{idx}{ARG_BEGIN}{args}{CALL_END}"


def section(*calls):
    return SECTION_BEGIN + "".join(calls) + SECTION_END


W0 = call(0, "get_weather", '{"city": "Paris"}')
W1 = call(1, "get_weather", '{"city": "北京", "days": [1, 2]}')
TC0 = ToolCall("functions.get_weather:0", "get_weather", '{"city": "Paris"}')
TC1 = ToolCall("functions.get_weather:1", "get_weather", '{"city": "北京", "days": [1, 2]}')

GOOD = {
    "think_then_content": ("<think>Let me see.\n</think>The answer is 4.", [R("Let me see.\n"), C("The answer is 4.")]),
    "no_leading_think": ("thinking…</think>done", [R("thinking…"), C("done")]),
    "whitespace_before_think": ("\n <think>r</think>c", [R("r"), C("c")]),
    "reasoning_only": ("<think>still going < <| </thi", [R("still going < <| </thi")]),
    "empty": ("", []),
    "content_then_calls": (f"<think>r</think>Checking.{section(W0, W1)}", [R("r"), C("Checking."), TC0, TC1]),
    "section_ends_reasoning": (f"<think>plan{section(W0)}", [R("plan"), TC0]),
    "whitespace_between_calls": (f"<think></think>{SECTION_BEGIN}\n{W0} \n{W1}\n{SECTION_END}", [TC0, TC1]),
    "dotted_name_and_spaces": (
        f"</think>{section(f'{CALL_BEGIN} functions.web.search:3 {ARG_BEGIN} {{}} {CALL_END}')}",
        [ToolCall("functions.web.search:3", "web.search", " {} ")],
    ),
    "im_end_stops": (f"<think>r</think>c{IM_END}ignored <think>", [R("r"), C("c")]),
    "content_after_section": (f"</think>{section(W0)}tail", [TC0, C("tail")]),
    "markers_look_alike": ("</think>a <|tool_call a </think> <think> <|im_end", [C("a <|tool_call a </think> <think> <|im_end")]),
    "non_ascii": ("<think>思考🤔</think>答案：4 ✅", [R("思考🤔"), C("答案：4 ✅")]),
}

BAD = {
    "bad_json": (f"</think>{section(call(0, 'f', '{bad'))}", "not valid JSON"),
    "not_an_object": (f"</think>{section(call(0, 'f', '[1, 2]'))}", "not a JSON object"),
    "nan": ("</think>" + section(call(0, "f", '{"x": NaN}')), "not valid JSON"),
    "unknown_tool": (f"</think>{section(call(0, 'rm_rf', '{}'))}", "unknown tool 'rm_rf'"),
    "bad_id": (f"</think>{section(f'{CALL_BEGIN}get_weather{ARG_BEGIN}{{}}{CALL_END}')}", "malformed tool call id"),
    "truncated_args": (f"</think>{SECTION_BEGIN}{CALL_BEGIN}functions.f:0{ARG_BEGIN}" + '{"a": ', "truncated"),
    "truncated_id": (f"</think>{SECTION_BEGIN}{CALL_BEGIN}functions.f", "truncated"),
    "no_arguments": (f"</think>{section(f'{CALL_BEGIN}functions.f:0{CALL_END}')}", "not followed by"),
    "restarted_call": (f"</think>{SECTION_BEGIN}{CALL_BEGIN}functions.f:0{ARG_BEGIN}{{{W0}{SECTION_END}", "not closed"),
    "section_end_in_args": (f"</think>{SECTION_BEGIN}{CALL_BEGIN}functions.f:0{ARG_BEGIN}{{}}{SECTION_END}", "not closed"),
    "junk_in_section": (f"</think>{SECTION_BEGIN}oops{W0}{SECTION_END}", "unexpected text"),
}


def feed_split(text, cuts, **kw):
    parser = OutputParser(**kw)
    events = []
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        events += parser.feed(text[a:b])
    return coalesce(events + parser.finish())


@pytest.mark.parametrize("name", sorted(GOOD))
def test_grammar_at_every_split_point(name):
    text, expected = GOOD[name]
    assert parse_output(text) == expected
    for k in range(len(text) + 1):
        assert feed_split(text, [k]) == expected, k
    assert feed_split(text, list(range(1, len(text)))) == expected  # one character at a time


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_calls_become_error_events(name):
    text, reason = BAD[name]
    events = parse_output(text, tool_names=["f", "get_weather"])
    errors = [e for e in events if isinstance(e, ToolCallError)]
    assert len(errors) == 1 and reason in errors[0].reason, events
    assert errors[0].raw and errors[0].raw in text  # the raw text is kept
    for k in range(len(text) + 1):
        assert feed_split(text, [k], tool_names=["f", "get_weather"]) == events


def test_restarted_call_still_yields_the_second_call():
    events = parse_output(BAD["restarted_call"][0])
    assert isinstance(events[0], ToolCallError) and events[1] == TC0


def test_start_in_content_mode():
    assert parse_output("Hi <think>x</think>", start_in_reasoning=False) == [C("Hi <think>x</think>")]
    assert parse_output(f"Hi{section(W0)}", start_in_reasoning=False) == [C("Hi"), TC0]


def test_feed_after_finish_is_ignored():
    p = OutputParser()
    assert p.feed("<think>a</th") == [R("a")]  # a possible marker is held back ...
    assert p.finish() == [R("</th")]  # ... and flushed as text at the end
    assert p.feed("more") == [] and p.finish() == []


ALPHABET = ["a", " ", "\n", "<", "|", ">", "{", "}", '"', ":", "0", "functions.f:0", "{}", "<think>", "</think>",
            SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END, IM_END, "<|tool_call", "</thi", "é"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ALPHABET), max_size=30).map("".join), st.data())
def test_arbitrary_output_never_raises_and_is_split_invariant(text, data):
    whole = parse_output(text, tool_names=["f"])
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=8)))
    assert feed_split(text, cuts, tool_names=["f"]) == whole
    assert all(not isinstance(e, (R, C)) or e.text for e in whole)


@settings(max_examples=100, deadline=None)
@given(
    st.text(alphabet=st.characters(blacklist_characters="<")),
    st.text(alphabet=st.characters(blacklist_characters="<")),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
)
def test_generated_grammar_round_trips(reasoning, content, args):
    arguments = json.dumps(args, ensure_ascii=False)
    text = f"<think>{reasoning}</think>{content}{section(call(0, 'f', arguments))}"
    expected = [e for e in (R(reasoning) if reasoning else None, C(content) if content else None) if e]
    assert parse_output(text) == [*expected, ToolCall("functions.f:0", "f", arguments)]


def test_parsed_message_renders_back_verbatim():
    """The parsed turn, put back into the history, renders as the model wrote it (prefix reuse relies on it)."""
    output = f"<think>plan</think>Checking.{section(W0, W1)}"
    message = assistant_message(parse_output(output))
    assert message["tool_calls"][1]["function"]["arguments"] == '{"city": "北京", "days": [1, 2]}'
    template = load_chat_template("/work/shared/models/kimi-k2-thinking")
    user = {"role": "user", "content": "weather?"}
    prompt = render_chat(template, [user])
    history = render_chat(template, [user, message], add_generation_prompt=False)
    assert history == prompt + output + IM_END
