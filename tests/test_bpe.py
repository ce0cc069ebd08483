"""BPE trainer and tiktoken.model writer: format, determinism, and agreement with tiktoken's engine."""

import regex
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from hybrid.synth.bpe import SAMPLE_CORPUS, train_bpe, write_tiktoken_model
from hybrid.text.tokenizer import KIMI_PAT_STR


def test_ranks_are_bytes_then_merges():
    ranks = train_bpe([SAMPLE_CORPUS], 700)
    assert len(ranks) == 700
    assert sorted(ranks.values()) == list(range(700))
    for b in range(256):
        assert ranks[bytes([b])] == b
    assert all(len(tok) > 1 for tok, r in ranks.items() if r >= 256)
    assert ranks[b" the"] < 400  # " the" is among the first merges of English text


def test_deterministic_and_prefix_stable():
    a = train_bpe([SAMPLE_CORPUS], 900)
    assert a == train_bpe([SAMPLE_CORPUS], 900)
    b = train_bpe([SAMPLE_CORPUS], 600)
    assert all(a[tok] == r for tok, r in b.items())  # fewer ranks = a prefix of the same merges


def test_sample_corpus_is_multilingual():
    assert 30_000 <= len(SAMPLE_CORPUS.encode("utf-8")) <= 60_000
    for needle in ["def ", '"arguments"', "天气", "🎉", "Москва", "2024"]:
        assert needle in SAMPLE_CORPUS


def test_tiny_corpus_fills_to_n_ranks():
    ranks = train_bpe(["ab ab abc"], 300)
    assert sorted(ranks.values()) == list(range(300))
    assert len(set(ranks)) == 300


def test_write_and_load_round_trip(tmp_path):
    ranks = train_bpe([SAMPLE_CORPUS], 1000)
    path = tmp_path / "tiktoken.model"
    write_tiktoken_model(path, ranks)
    assert load_tiktoken_bpe(str(path)) == ranks
    first = path.read_text().splitlines()[0]
    assert first == "AA== 0"


def test_regex_v1_split_matches_tiktoken_engine():
    ranks = train_bpe([SAMPLE_CORPUS], 2000)
    enc = tiktoken.Encoding("t", pat_str=KIMI_PAT_STR, mergeable_ranks=ranks, special_tokens={})
    text = SAMPLE_CORPUS[:8000] + " HELLO World's  x\u0301y\t\r\n\n 中文abc ١٢٣ 12345 \n  "
    pieces = regex.findall(KIMI_PAT_STR, text, flags=regex.V1)
    by_piece = [t for p in pieces for t in enc._encode_single_piece(p)]
    assert by_piece == enc.encode_ordinary(text)
    assert enc.decode(enc.encode_ordinary(text)) == text
