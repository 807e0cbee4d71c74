"""Thin wrapper over a `tokenizers` tokenizer.json, plus a streaming detokenizer.

The wrapper adds no special tokens: the chat template writes them as text, and special-token strings in
the text are matched as single ids. Which strings are special comes from the manifest, never from ids
written here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import BundleError, InputError

REPLACEMENT_CHAR = "\ufffd"  # what decoding an incomplete UTF-8 sequence yields


def _byte_level_alphabet() -> dict[str, int]:
    """ByteLevel's printable character -> byte map (GPT-2's reversible table, inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(extra))]
    return {chr(c): b for b, c in zip(printable + extra, chars, strict=True)}


class Tokenizer:
    def __init__(self, path: str | Path):
        """Load `path` (a tokenizer.json file, or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on missing or malformed files
            raise BundleError(f"{path}: cannot load tokenizer: {e}") from e
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self._added_ids = frozenset(self._tok.get_added_tokens_decoder())
        self._bytes: dict[int, bytes] = {}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it become their single ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """As `encode`, with each token's [start, end) character span in `text`."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise BundleError(f"{self.path}: the tokenizer has no token {token!r}")
        return tid

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a piece of a UTF-8 character possibly); b"" for an id
        without a token (a padded embedding row). Added tokens are their text."""
        token_id = int(token_id)
        if token_id not in self._bytes:
            self._bytes[token_id] = self._token_bytes(token_id)
        return self._bytes[token_id]

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids:
            return piece.encode("utf-8")
        raw = byte_level_bytes(piece)  # byte-level BPE (Qwen2, the synthetic tokenizer)
        return raw if raw is not None else self._tok.decode([token_id]).encode("utf-8")


_BYTE_LEVEL = _byte_level_alphabet()


def byte_level_bytes(piece: str) -> bytes | None:
    """The bytes of a ByteLevel vocabulary entry ("Ġhello" -> b" hello"); None if it is not one."""
    try:
        return bytes(_BYTE_LEVEL[ch] for ch in piece)
    except KeyError:
        return None


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces that never split a character.

    Byte-level BPE can spread one UTF-8 character over several tokens; decoding a partial sequence yields
    U+FFFD, so such text is held back until a later token completes it (or flush() is called). The pieces
    concatenate to exactly `tokenizer.decode(ids)` for the ids not in `skip_special_ids`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.skip = frozenset(int(i) for i in skip_special_ids)
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window: decoding starts at a character boundary
        self._read = 0  # ids before this have been emitted as text

    def add(self, token_id: int) -> str:
        """Feed one id; return the text it completes ("" while a character is still incomplete)."""
        if int(token_id) in self.skip or not 0 <= int(token_id) < self.tokenizer.vocab_size:
            # An embedding table can have more rows than the tokenizer has tokens (padded tables; a
            # synthetic checkpoint with the small built-in tokenizer). A model can still sample such
            # an id, and it has no text: it must not end the reply with an error.
            return ""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is held back (an unfinished character decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        # Decoding with a little already-emitted context keeps decoders that strip or merge at the
        # start of a sequence (SentencePiece-style spaces) consistent with decoding everything at once.
        before = self.tokenizer.decode(self._ids[self._prefix:self._read])
        text = self.tokenizer.decode(self._ids[self._prefix:])
        if not final and (text.endswith(REPLACEMENT_CHAR) or len(text) <= len(before)):
            return ""
        del self._ids[:self._read]  # keep only the new context window
        self._prefix, self._read = 0, len(self._ids)
        return text[len(before):]
