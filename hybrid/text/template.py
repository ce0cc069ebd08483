"""Chat-template rendering: the checkpoint's own chat_template.jinja, rendered as transformers does.

Owns: the sandboxed jinja2 environment (trim/lstrip blocks, loop controls, transformers' `tojson`,
`raise_exception`, `strftime_now`, guarded `dict`/`namespace`), and the input clean-up transformers'
`apply_chat_template` applies first (None-valued message keys dropped, reasoning field aliases, plain
data only). Must not: tokenize, decide what reasoning is kept (the template decides), or parse output.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hybrid.text.tokenizer import strip_marks

logger = logging.getLogger(__name__)

# Names a message's reasoning may arrive under; the first is the one chat templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(Exception):
    """The chat template is missing, does not compile, or fails while rendering these messages."""


def load_chat_template(path: str | os.PathLike) -> str:
    """Template text from a checkpoint dir: chat_template.jinja, else tokenizer_config.json's
    "chat_template" (a string, or a list of {name, template} where "default" is used), as HF does."""
    path = Path(path)
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ChatTemplateError(f"{jinja_file}: not UTF-8 text ({e.reason} at byte {e.start}); fetch it again") from None
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        try:
            template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        except ValueError as exc:
            raise ChatTemplateError(f"malformed {config_file}: {exc}") from exc
        if isinstance(template, list):
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if isinstance(template, str):
            return template
    raise ChatTemplateError(f"no chat template: neither {jinja_file} nor a 'chat_template' in {config_file}")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers in some templates): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace(), refusing underscore-prefixed attributes (no reach into object internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's own signature trick: `self` may be a kwarg
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with '_'")


class _DictFactory:
    """`dict(...)` and `dict.fromkeys(...)` in templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # transformers' filter: plain json.dumps, no HTML escaping (jinja's own escapes <>&' and returns Markup)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template_str: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictFactory(), namespace=_Namespace
    )
    try:
        return env.from_string(template_str)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile (line {exc.lineno}): {exc.message}") from exc


def _plain(value: Any) -> Any:
    """JSON-like data only, so the sandbox never sees methods of rich objects: dataclasses and pydantic
    models become dicts, str/int/float subclasses their base type, anything else '<TypeName>'."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    if callable(getattr(value, "item", None)) and type(value).__module__ == "numpy":
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _unmarked_key(item: tuple) -> Any:
    return strip_marks(item[0]) if isinstance(item[0], str) else item[0]


def _sorted_keys(obj: Any) -> Any:
    if isinstance(obj, dict):  # by the user's text: keys marked by Tokenizer.mark_user_text sort as unmarked
        return {k: _sorted_keys(v) for k, v in sorted(obj.items(), key=_unmarked_key)}
    if isinstance(obj, list):
        return [_sorted_keys(v) for v in obj]
    return obj


def normalize_messages(messages: Sequence[Any]) -> list[dict]:
    """Messages as transformers' apply_chat_template hands them to the template: plain dicts, top-level
    None values dropped (so `content: None` / `reasoning_content: None` act as absent), and reasoning
    given as `thinking` or `reasoning` also readable as `reasoning_content` (and `thinking`)."""
    out = []
    for i, message in enumerate(messages):
        message = _plain(message)
        if not isinstance(message, dict):
            raise ChatTemplateError(f"message {i} is not a dict (or dataclass / pydantic model): {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat(
    template_str: str | None,
    messages: Sequence[Any],
    tools: Sequence[Mapping] | None = None,
    add_generation_prompt: bool = True,
    *,
    sort_tool_keys: bool = False,
    **kwargs: Any,
) -> str:
    """Render messages (OpenAI style, with `reasoning_content` and `tool_calls`) with the template.

    Equal to transformers' `tokenizer.apply_chat_template(..., tokenize=False)` for the same template and
    inputs. tools: JSON-schema dicts. sort_tool_keys: sort tool dict keys recursively first, as Moonshot's
    own tokenizer wrapper does (Kimi-Linear's tokenization_kimi.py). kwargs: extra template variables.
    """
    if not template_str:
        raise ChatTemplateError("no chat template given (the checkpoint has no chat_template.jinja?)")
    template = _compile(template_str)
    if tools is not None:
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise ChatTemplateError(f"tool {i} must be a JSON-schema dict, got {type(tool).__name__}")
        tools = _plain(list(tools))
        if sort_tool_keys:
            tools = _sorted_keys(tools)
    try:
        return template.render(
            messages=normalize_messages(messages),
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **_plain(kwargs),
        )
    except ChatTemplateError:
        raise
    except Exception as exc:  # the template is data from the checkpoint; any failure is its error
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
