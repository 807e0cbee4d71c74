"""Tokenizer wrapper and StreamingDetokenizer (runtime/tokenizer.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicpmo.runtime.errors import BundleError, InputError
from minicpmo.runtime.tokenizer import StreamingDetokenizer, Tokenizer

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TOKENIZER_DIR = SHARED / "reference" / "tokenizer"
TEXTS = ["Hello, world!", "你好，世界！这是一个测试。", "emoji 😀👍🏽 and 🇫🇷 flags", "mixed 中文 text — with ünïcödé ✓",
         "<|im_start|>user\n看图😀<|im_end|>\n"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: the token string of each single byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip("reference tokenizer not available (../shared/reference/tokenizer)")
    return Tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def byte_ids(tok) -> dict[int, int]:
    return {b: tok.token_to_id(c) for b, c in _bytes_to_unicode().items()}


def stream(tok: Tokenizer, ids: list[int], skip=()) -> list[str]:
    detok = StreamingDetokenizer(tok, skip_special_ids=skip)
    pieces = [detok.add(i) for i in ids]
    return pieces + [detok.flush()]


# -- wrapper -----------------------------------------------------------------------------------------

def test_encode_parses_special_tokens_and_adds_none(tok):
    assert tok.encode("<image><unk></image>") == [151665, 128244, 151666]
    assert tok.encode("\n") == [198]
    assert tok.encode("<|im_start|>system") == [151644, 8948]
    assert tok.encode("user")[0] == 872 and tok.encode("assistant") == [77091]
    assert tok.encode("") == []


def test_decode_and_special_tokens(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert 151645 in tok.special_ids and 198 not in tok.special_ids


def test_vocab_and_lookups(tok, tmp_path):
    assert tok.vocab_size == 151700
    assert tok.token_to_id("<|im_end|>") == 151645
    assert tok.id_to_token(151665) == "<image>"
    with pytest.raises(BundleError, match="no token '<nope>'"):
        tok.token_to_id("<nope>")
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.decode([151700])
    with pytest.raises(BundleError, match="cannot load tokenizer"):
        Tokenizer(tmp_path)


def test_loads_from_file_path(tok):
    assert Tokenizer(TOKENIZER_DIR / "tokenizer.json").encode("hi") == tok.encode("hi")


# -- streaming ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_stream_of_encoded_text_equals_decode(tok, text):
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_gives_no_text_for_ids_past_the_tokenizer(tok):
    """A model whose embedding table has more rows than its tokenizer can sample one of them: no text,
    no error in the middle of a reply."""
    ids = tok.encode("Hello, world!")
    detok = StreamingDetokenizer(tok)
    pieces = [detok.add(i) for i in ids[:2]] + [detok.add(tok.vocab_size + 5)] + [detok.add(i) for i in ids[2:]]
    assert "".join(pieces) + detok.flush() == "Hello, world!"


def test_multibyte_character_is_held_until_complete(tok, byte_ids):
    ids = [byte_ids[b] for b in "a😀".encode()]
    detok = StreamingDetokenizer(tok)
    assert [detok.add(i) for i in ids] == ["a", "", "", "", "😀"]
    assert detok.flush() == ""


def test_unfinished_character_comes_out_on_flush(tok, byte_ids):
    detok = StreamingDetokenizer(tok)
    assert detok.add(byte_ids[0xE4]) == ""
    assert detok.flush() == "\ufffd"


def test_random_byte_splits_equal_full_decode(tok, byte_ids):
    rng = random.Random(7)
    data = "".join(TEXTS).encode()
    for _ in range(30):
        # cut the UTF-8 bytes at random points; each piece is tokenized on its own, so tokens
        # (and characters) straddle the cuts
        cuts = sorted(rng.sample(range(1, len(data)), 12))
        ids = []
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            ids += [byte_ids[x] for x in data[a:b]] if rng.random() < 0.5 else _encode_bytes(tok, byte_ids, data[a:b])
        assert "".join(stream(tok, ids)) == tok.decode(ids) == data.decode()


def _encode_bytes(tok, byte_ids, chunk: bytes) -> list[int]:
    try:
        return tok.encode(chunk.decode())
    except UnicodeDecodeError:
        return [byte_ids[x] for x in chunk]


def test_invalid_utf8_stream_still_equals_decode(tok, byte_ids):
    rng = random.Random(3)
    for _ in range(30):
        ids = [byte_ids[rng.choice([0x41, 0xE4, 0xBD, 0xA0, 0xF0, 0x9F, 0xFF, 0x80, 0x20])] for _ in range(20)]
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_skipped_ids_are_dropped(tok):
    ids = tok.encode("你好<|im_end|>")
    assert "".join(stream(tok, ids, skip={151645})) == "你好"


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40), seed=st.integers(0, 99))
def test_stream_equals_decode_for_any_text(tok, byte_ids, text, seed):
    ids = tok.encode(text)
    rng = random.Random(seed)
    # splice in a few raw byte tokens so characters are split across tokens
    for _ in range(3):
        ids.insert(rng.randrange(len(ids) + 1), byte_ids[rng.randrange(256)])
    assert "".join(stream(tok, ids)) == tok.decode(ids)
