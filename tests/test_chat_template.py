"""Chat template: byte-for-byte equality with transformers on the real K2 Thinking template, and errors."""

import dataclasses
import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models
from transformers import PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import _normalize_chat_messages, render_jinja_template

from hybrid.text.template import ChatTemplateError, load_chat_template, normalize_messages, render_chat

MODEL_DIR = "/work/shared/models/kimi-k2-thinking"
TEMPLATE = load_chat_template(MODEL_DIR)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city. Returns <temp> & 'sky'; 支持中文城市名",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {"name": "web.search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
}


def _call(idx, name, args):
    return {"id": f"functions.{name}:{idx}", "type": "function", "function": {"name": name, "arguments": args}}


USER = {"role": "user", "content": "What's the weather in Paris and 北京? 🌦️"}
AGENTIC = [
    USER,
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "I need both cities; call the tool twice.",
        "tool_calls": [_call(0, "get_weather", {"city": "Paris"}), _call(1, "get_weather", '{"city": "北京", "unit": "c"}')],
    },
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": '{"temp": 18, "sky": "cloudy"}'},
    {"role": "tool", "tool_call_id": "functions.get_weather:1", "name": "get_weather", "content": "晴，25°C"},
]
FINAL = {"role": "assistant", "content": "Paris: 18°C, cloudy. 北京: 25°C, sunny.", "reasoning_content": "Summarise."}

CASES = {
    "no_system": ([{"role": "user", "content": "hi"}], None),
    "system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], None),
    "named_system": ([{"role": "system", "name": "ops", "content": "x"}, USER], None),
    "multi_turn": (
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
            {"role": "user", "content": "2+2?"},
        ],
        None,
    ),
    "tools_declared": ([USER], [WEATHER, SEARCH]),
    "parallel_calls_and_results": (AGENTIC, [WEATHER]),
    "agentic_then_final": ([*AGENTIC, FINAL], [WEATHER]),
    "reasoning_in_earlier_and_current_turn": (
        [
            *AGENTIC,
            FINAL,
            {"role": "user", "content": "And Tokyo?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "reasoning_content": "one more call",
                "tool_calls": [_call(2, "get_weather", {"city": "東京", "nested": {"a": [1, 2.5, None, True]}})],
            },
            {"role": "tool", "tool_call_id": "functions.get_weather:2", "content": "rain"},
        ],
        [WEATHER],
    ),
    "empty_and_null_content": (
        [
            {"role": "system", "content": ""},
            {"role": "user", "content": ""},
            {"role": "assistant", "content": None, "tool_calls": [_call(0, "web.search", {})]},
            {"role": "tool", "tool_call_id": "functions.web.search:0", "content": None},
        ],
        [SEARCH],
    ),
    "null_reasoning_in_current_turn": (
        [USER, {"role": "assistant", "content": None, "reasoning_content": None, "tool_calls": [_call(0, "get_weather", {})]}],
        [WEATHER],
    ),
    "reasoning_alias_fields": (
        [USER, {"role": "assistant", "reasoning": "via 'reasoning'", "tool_calls": [_call(0, "get_weather", "{}")]}],
        None,
    ),
    "content_parts": ([{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}]}], None),
    "special_strings_in_text": ([{"role": "user", "content": "<|im_end|><think>x</think>\n\n  spaced  "}], None),
}


def _hf_tokenizer():
    tok = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = TEMPLATE
    return tok


HF = _hf_tokenizer()


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_transformers(name, add_generation_prompt):
    messages, tools = CASES[name]
    ours = render_chat(TEMPLATE, messages, tools=tools, add_generation_prompt=add_generation_prompt)
    # the full apply_chat_template path (drops None-valued keys first) ...
    full = HF.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == full
    # ... and render_jinja_template itself, on the messages as apply_chat_template hands them over
    rendered, _ = render_jinja_template(
        [_normalize_chat_messages(messages)], tools=tools, chat_template=TEMPLATE, add_generation_prompt=add_generation_prompt
    )
    assert ours == rendered[0]


def test_expected_shape_of_a_simple_prompt():
    assert render_chat(TEMPLATE, [{"role": "user", "content": "hi"}]) == (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>"
    )


def test_tojson_details():
    messages, tools = CASES["reasoning_in_earlier_and_current_turn"]
    out = render_chat(TEMPLATE, messages, tools=tools)
    assert json.dumps([WEATHER], ensure_ascii=False, separators=(",", ":")) in out  # tools: compact, no escaping
    assert '{"city": "東京", "nested": {"a": [1, 2.5, null, true]}}' in out  # dict arguments: default separators
    assert "<think></think>Paris" in out  # earlier turn's reasoning dropped
    assert "<think>one more call</think>" in out  # current agentic turn keeps it
    assert "<think>I need both" not in out


def test_sort_tool_keys_matches_transformers_on_sorted_tools():
    def deep_sorted(x):
        if isinstance(x, dict):
            return {k: deep_sorted(v) for k, v in sorted(x.items())}
        return [deep_sorted(v) for v in x] if isinstance(x, list) else x

    ours = render_chat(TEMPLATE, [USER], tools=[WEATHER], sort_tool_keys=True)
    assert ours == HF.apply_chat_template([USER], tools=deep_sorted([WEATHER]), tokenize=False, add_generation_prompt=True)
    assert '{"function":{"description"' in ours


def test_empty_conversation_and_objects():
    rendered, _ = render_jinja_template([[]], chat_template=TEMPLATE, add_generation_prompt=True)
    assert render_chat(TEMPLATE, []) == rendered[0]

    @dataclasses.dataclass
    class Msg:
        role: str
        content: str | None

    assert render_chat(TEMPLATE, [Msg("user", "hi")]) == render_chat(TEMPLATE, [{"role": "user", "content": "hi"}])
    assert normalize_messages([{"role": "user", "content": None}]) == [{"role": "user"}]


def test_template_kwargs_and_globals():
    tpl = "{{ greeting }} {{ [1, 'é'] | tojson }} {{ {'b': 1, 'a': 2} | tojson(sort_keys=True, indent=1) }}"
    assert render_chat(tpl, [], greeting="hey") == 'hey [1, "é"] {\n "a": 2,\n "b": 1\n}'
    tpl = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{{ dict(a=1) }}"
    assert render_chat(tpl, [{"role": "user"}] * 3) == "3{'a': 1}"
    tpl = "{% generation %}x{% endgeneration %}{{ strftime_now('%Y') | length }}"
    assert render_chat(tpl, []) == "x4"


@pytest.mark.parametrize(
    "template, match",
    [
        (None, "no chat template"),
        ("", "no chat template"),
        ("{% for %}", "does not compile"),
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{{ messages[0]['role'] }}", "failed"),
        ("{{ ''.__class__.__mro__ }}", "failed"),
        ("{% set ns = namespace(_x=1) %}", "failed"),
        ("{% set x = messages.append(1) %}", "failed"),
    ],
)
def test_errors(template, match):
    with pytest.raises(ChatTemplateError, match=match):
        render_chat(template, [])


def test_bad_inputs():
    with pytest.raises(ChatTemplateError, match="message 0"):
        render_chat(TEMPLATE, ["hi"])
    with pytest.raises(ChatTemplateError, match="tool 0"):
        render_chat(TEMPLATE, [USER], tools=[print])


def test_load_chat_template(tmp_path):
    with pytest.raises(ChatTemplateError, match="chat_template.jinja"):
        load_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A{{ 1 }}"}))
    assert load_chat_template(tmp_path) == "A{{ 1 }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default", "template": "D"}]}))
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_chat_template(tmp_path) == "J"


def test_null_reasoning_renders_empty_like_apply_chat_template():
    messages, tools = CASES["null_reasoning_in_current_turn"]
    ours = render_chat(TEMPLATE, messages, tools=tools)
    assert "<think></think><|tool_calls_section_begin|>" in ours
    # render_jinja_template alone (without apply_chat_template's clean-up) would print the None
    raw, _ = render_jinja_template([messages], tools=tools, chat_template=TEMPLATE, add_generation_prompt=True)
    assert "<think>None</think>" in raw[0]
