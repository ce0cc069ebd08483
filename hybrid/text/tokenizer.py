"""Kimi's tiktoken tokenizer, loaded from a checkpoint directory, and a streaming detokenizer.

Owns: reading `tiktoken.model` + `tokenizer_config.json`, Kimi's pre-tokenizer pattern (KIMI_PAT_STR,
which the synthetic BPE trainer also splits with), the 256 reserved special ids after the BPE ranks,
special-token policy (user/tool text never becomes control tokens, also through the template via
mark_user_text + encode_chat), the real tokenizer's chunking of long inputs, and UTF-8-safe streaming
decode. Must not: render chat templates or parse model output (text/template.py, text/parser.py); it
never touches the network.
"""

from __future__ import annotations

import codecs
import copy
import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken.load import load_tiktoken_bpe

logger = logging.getLogger(__name__)

# Kimi's tiktoken split pattern: 8 alternatives; `&&` is character-class intersection, which
# tiktoken's Rust engine and `regex` (with the V1 flag) support and the stdlib `re` does not.
_KIMI_PAT_PARTS = [
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
]
KIMI_PAT_STR: str = "|".join(_KIMI_PAT_PARTS)

NUM_RESERVED_SPECIAL = 256
REAL_N_RANKS = 163_584  # the real checkpoint's BPE ranks; its specials are 163584..163839
# Kimi's tokenization_kimi.py chunks input before tiktoken (tiktoken issue 195); same limits here
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")  # re's \s and str.isspace agree (both Py_UNICODE_ISSPACE)
# private-use markers around special-token strings found in user-supplied text (see mark_user_text)
MARK_OPEN, MARK_CLOSE = "\U000f0000", "\U000f0001"


def strip_marks(text: str) -> str:
    """Text with the user-text markers removed (for display of a marked, rendered chat)."""
    return text.replace(MARK_OPEN, "").replace(MARK_CLOSE, "")


class TokenizerError(Exception):
    """A tokenizer file is missing or malformed, or a named token does not exist."""


def shift_special_ids(tokenizer_config: dict, n_ranks: int) -> dict:
    """Copy of a real-model tokenizer_config with special ids moved to follow `n_ranks` BPE ranks.

    The real specials are 163584 + k (k in 0..255); a synthetic tokenizer with n_ranks ranks has them
    at n_ranks + k, as the real model's loader numbers them from len(ranks).
    """
    out = copy.deepcopy(tokenizer_config)
    shifted = {}
    for key, entry in tokenizer_config.get("added_tokens_decoder", {}).items():
        k = int(key) - REAL_N_RANKS
        if not 0 <= k < NUM_RESERVED_SPECIAL:
            raise TokenizerError(f"special id {key} is not one of the real model's 163584..163839")
        shifted[str(n_ranks + k)] = copy.deepcopy(entry)
    out["added_tokens_decoder"] = shifted
    return out


def _chunks(text: str, block_chars: int = _MAX_ENCODE_CHARS, run_chars: int = _MAX_RUN_CHARS) -> Iterable[str]:
    """Split as tokenization_kimi.py does: 400k-char blocks, then cut runs of >25k (non-)space chars."""
    for i in range(0, len(text), block_chars):
        block = text[i : i + block_chars]
        start = 0
        for run in _RUNS.finditer(block):
            for cut in range(run.start() + run_chars, run.end(), run_chars):
                yield block[start:cut]
                start = cut
        if start < len(block):
            yield block[start:]


def _load_ranks(path: Path) -> dict[bytes, int]:
    if not path.is_file():
        raise TokenizerError(f"tokenizer file missing: {path}")
    try:
        ranks = load_tiktoken_bpe(str(path))
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"malformed {path}: expected lines 'base64(token) rank' ({exc})") from exc
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"malformed {path}: ranks must be the integers 0..n-1, each once")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise TokenizerError(f"malformed {path}: every single byte needs a rank (byte-level BPE)")
    return ranks


def _load_specials(path: Path, n_ranks: int) -> tuple[dict[str, int], set[int]]:
    """-> ({name: id} for all 256 reserved ids, {ids whose config entry says special: true})."""
    if not path.is_file():
        raise TokenizerError(f"tokenizer file missing: {path}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        decoder = config.get("added_tokens_decoder", {})
        named = {int(k): v["content"] for k, v in decoder.items()}
        flagged = {int(k) for k, v in decoder.items() if v.get("special", True)}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TokenizerError(f"malformed {path}: {exc!r}") from exc
    bad = sorted(i for i in named if not n_ranks <= i < n_ranks + NUM_RESERVED_SPECIAL)
    if bad:
        raise TokenizerError(
            f"malformed {path}: special ids {bad[:3]} are outside {n_ranks}..{n_ranks + NUM_RESERVED_SPECIAL - 1} "
            "(the 256 ids after the BPE ranks); a synthetic checkpoint needs shift_special_ids()"
        )
    specials = {}
    for i in range(n_ranks, n_ranks + NUM_RESERVED_SPECIAL):
        specials[named.get(i, f"<|reserved_token_{i}|>")] = i
    if len(specials) != NUM_RESERVED_SPECIAL:
        raise TokenizerError(f"malformed {path}: two special ids share one name")
    reserved = set(range(n_ranks, n_ranks + NUM_RESERVED_SPECIAL)) - set(named)
    return specials, flagged | reserved


class Tokenizer:
    """tiktoken Encoding with Kimi's pattern, ranks and 256 specials; one per engine."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], skip_ids: set[int] | None = None):
        self.encoding = tiktoken.Encoding(
            name="kimi", pat_str=KIMI_PAT_STR, mergeable_ranks=ranks, special_tokens=special_tokens
        )
        self.n_ranks = len(ranks)
        self.special_tokens = dict(special_tokens)
        self._skip_ids = frozenset(skip_ids if skip_ids is not None else special_tokens.values())
        names = "|".join(re.escape(n) for n in sorted(special_tokens, key=len, reverse=True))
        self._special_re = re.compile(names)
        # a marked name -> group 1; a lone marker (a template cut a marked name apart) -> group None
        self._marked_re = re.compile(f"{MARK_OPEN}({names}){MARK_CLOSE}|[{MARK_OPEN}{MARK_CLOSE}]")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        ranks = _load_ranks(path / "tiktoken.model")
        specials, skip = _load_specials(path / "tokenizer_config.json", len(ranks))
        logger.debug("tokenizer from %s: %d ranks + %d specials", path, len(ranks), len(specials))
        return cls(ranks, specials, skip)

    @property
    def n_vocab(self) -> int:
        return self.n_ranks + NUM_RESERVED_SPECIAL

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids for text. allow_special=False: special-token strings stay plain text (user/tool
        content); True: they become control ids, as the real tokenizer does for template output."""
        ids: list[int] = []
        for chunk in _chunks(text):
            if allow_special:
                ids += self.encoding.encode(chunk, allowed_special="all")
            else:
                ids += self.encoding.encode_ordinary(chunk)
        return ids

    def mark_user_text(self, obj: Any) -> Any:
        """Copy of messages / tools with every special-token string inside their strings wrapped in
        private-use markers, at any depth: values and dict keys alike (a tool's property names, the keys
        of call arguments), in dicts and other mappings, lists, tuples, dataclasses and pydantic models
        (which become dicts, as the template sees them anyway); other values as is. Render the marked
        copy, then encode_chat() keeps those as plain text while the template's own control strings
        become ids."""
        if isinstance(obj, str):
            return self._special_re.sub(lambda m: MARK_OPEN + m.group(0) + MARK_CLOSE, strip_marks(obj))
        if isinstance(obj, Mapping):
            return {self.mark_user_text(k): self.mark_user_text(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return (list if isinstance(obj, list) else tuple)(self.mark_user_text(v) for v in obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: self.mark_user_text(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if callable(getattr(obj, "model_dump", None)):  # a pydantic model
            return self.mark_user_text(obj.model_dump())
        return obj

    def encode_chat(self, rendered: str) -> list[int]:
        """Ids of a rendered chat: control strings become special ids, except those marked by
        mark_user_text, which stay text (their markers are dropped, as are lone markers)."""
        pieces = self._marked_re.split(rendered)  # [text, marked name or None, text, ...]
        ids = self.encode(pieces[0], allow_special=True)
        for i in range(1, len(pieces), 2):
            if pieces[i] is not None:
                ids += self.encode(pieces[i], allow_special=False)
            ids += self.encode(pieces[i + 1], allow_special=True)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ids; invalid UTF-8 becomes U+FFFD. skip_special drops ids flagged special: true
        (and the unnamed reserved ids), keeping <think> and the tool-call markers like HF does."""
        if skip_special:
            ids = [i for i in ids if i not in self._skip_ids]
        return self.encoding.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.n_ranks

    def token_id(self, name: str) -> int:
        """Id of a special token by its string, e.g. '<|im_end|>'."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise TokenizerError(f"no special token {name!r} in this tokenizer") from None

    @property
    def im_end_id(self) -> int:
        return self.token_id("<|im_end|>")

    @property
    def im_user_id(self) -> int:
        return self.token_id("<|im_user|>")

    @property
    def im_assistant_id(self) -> int:
        return self.token_id("<|im_assistant|>")

    @property
    def im_system_id(self) -> int:
        return self.token_id("<|im_system|>")

    @property
    def im_middle_id(self) -> int:
        return self.token_id("<|im_middle|>")

    @property
    def think_id(self) -> int:
        return self.token_id("<think>")

    @property
    def think_end_id(self) -> int:
        return self.token_id("</think>")

    @property
    def tool_calls_section_begin_id(self) -> int:
        return self.token_id("<|tool_calls_section_begin|>")

    @property
    def tool_calls_section_end_id(self) -> int:
        return self.token_id("<|tool_calls_section_end|>")

    @property
    def tool_call_begin_id(self) -> int:
        return self.token_id("<|tool_call_begin|>")

    @property
    def tool_call_argument_begin_id(self) -> int:
        return self.token_id("<|tool_call_argument_begin|>")

    @property
    def tool_call_end_id(self) -> int:
        return self.token_id("<|tool_call_end|>")

    @property
    def bos_id(self) -> int:
        return self.token_id("[BOS]")

    @property
    def eos_id(self) -> int:
        return self.token_id("[EOS]")

    @property
    def pad_id(self) -> int:
        return self.token_id("[PAD]")

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end a generation: <|im_end|> (the model's EOS) and [EOS]."""
        return frozenset(self.special_tokens[n] for n in ("<|im_end|>", "[EOS]") if n in self.special_tokens)


class StreamDecoder:
    """Token-by-token detokenizer: push(id) returns only complete UTF-8 characters; the pieces of a
    stream concatenate to tokenizer.decode(all ids). A tail left incomplete at finish() becomes U+FFFD."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: int | Sequence[int]) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self._utf8.decode(self._tokenizer.decode_bytes(token_ids))

    def finish(self) -> str:
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out
