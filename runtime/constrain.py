"""Structured outputs: the sampler constrained to a JSON grammar (OpenAI's `response_format`).

The grammar engine is llguidance, chosen by measuring (benchmarks/grammar.py, docs/serving.md): at
the 151,700-token vocabulary it computes a token mask in tens to hundreds of microseconds per token,
with no precomputation per schema, works on numpy buffers, and imports no torch. outlines-core builds
an automaton over the whole vocabulary for each schema (seconds per new schema), and xgrammar imports
torch and transformers at import time, which the runtime must not need.

One `GrammarVocabulary` per loaded tokenizer (building it walks the vocabulary once, ~1 s at 151k
tokens); one `GrammarConstraint` per request, owned by that request's Sampler: it masks the logits
before sampling, follows every token the sampler chooses, tells how much of a prompt-lookup draft the
grammar allows, and once the grammar is complete allows only the stop tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)
# Compact JSON (no whitespace between tokens), as OpenAI's structured outputs write it; free whitespace
# would also let a weak model fill max_tokens with blanks instead of closing the object.
JSON_OPTIONS = {"whitespace_flexible": False}
FORMAT_TYPES = ("text", "json_object", "json_schema")
# How llguidance words a schema it cannot enforce (as opposed to one that is wrong or unsatisfiable).
_UNSUPPORTED = ("Unimplemented", "not supported", "Unknown format", "not present in a registry")


def _bad(message: str, param: str = "response_format", code: str = "invalid_response_format") -> InputError:
    return InputError(message, param=param, code=code)


def schema_of(response_format: Mapping[str, Any] | None) -> dict | None:
    """The JSON schema an OpenAI `response_format` asks for; None for plain text. Raises InputError."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise _bad("response_format must be an object such as {\"type\": \"json_object\"}")
    kind = response_format.get("type", "text")
    if kind not in FORMAT_TYPES:
        raise _bad(f"response_format.type must be one of {', '.join(FORMAT_TYPES)}, got {kind!r}",
                   param="response_format.type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise _bad("response_format.json_schema must be an object with a \"schema\"", "response_format.json_schema")
    schema = spec.get("schema")
    if schema is None:  # OpenAI: an absent schema allows any JSON
        schema = {}
    if isinstance(schema, bool) or not isinstance(schema, Mapping):
        raise _bad("response_format.json_schema.schema must be a JSON Schema object",
                   "response_format.json_schema.schema")
    return dict(schema)


def grammar_for(response_format: Mapping[str, Any] | None) -> str | None:
    """The llguidance grammar of a `response_format` (None for text), checked: a schema feature the
    engine does not implement is an InputError naming it (code unsupported_schema_feature); a wrong
    or unsatisfiable schema one saying why (code invalid_json_schema)."""
    import llguidance as llg

    schema = schema_of(response_format)
    if schema is None:
        return None
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise _bad(f"response_format.json_schema.schema: {e}", "response_format.json_schema.schema") from e
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        reason = " ".join(messages[0].split())  # one line (regex errors come with a caret drawing)
        if any(word in reason for word in _UNSUPPORTED):
            raise _bad(f"response_format.json_schema.schema: a JSON Schema feature that cannot be enforced "
                       f"here: {reason}", "response_format.json_schema.schema", code="unsupported_schema_feature")
        raise _bad(f"response_format.json_schema.schema: invalid or unsatisfiable JSON Schema: {reason}",
                   "response_format.json_schema.schema", code="invalid_json_schema")
    return grammar


class GrammarVocabulary:
    """llguidance's view of a tokenizer: built once, shared by every request's constraint."""

    def __init__(self, tokenizer_json: str, n_vocab: int, stop_ids: Iterable[int]):
        """tokenizer_json: the tokenizer.json text; n_vocab: the logits width (the embedding table's rows,
        possibly more than the tokenizer's tokens); stop_ids: what ends a reply once the grammar is done."""
        import llguidance as llg

        t0 = time.perf_counter()
        self.n_vocab = n_vocab
        self.stop_ids = sorted(int(i) for i in stop_ids)
        self._tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=self.stop_ids)
        log.debug("grammar vocabulary of %d tokens built in %.2f s", n_vocab, time.perf_counter() - t0)

    def constraint(self, response_format: Mapping[str, Any] | None) -> GrammarConstraint | None:
        """A fresh constraint for one request (None for plain text); raises InputError."""
        import llguidance as llg

        grammar = grammar_for(response_format)
        if grammar is None:
            return None
        matcher = llg.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise _bad(f"response_format: {matcher.get_error()}", code="unsupported_schema_feature")
        return GrammarConstraint(matcher, self.n_vocab)


class GrammarConstraint:
    """The grammar state of one reply. Not thread-safe (one per request, like its Sampler)."""

    def __init__(self, matcher, n_vocab: int):
        import llguidance.numpy as lln

        self._matcher = matcher
        self._fill = lln.fill_next_token_bitmask
        self._bitmask = lln.allocate_token_bitmask(1, n_vocab)
        self.n_vocab = n_vocab

    def allowed(self) -> np.ndarray:
        """bool [V]: the tokens the grammar allows next (only the stop tokens once it is complete)."""
        self._check()
        self._fill(self._matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")
        return bits[:self.n_vocab].astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of logits [V] with every token the grammar forbids at -inf."""
        return np.where(self.allowed(), logits, -np.inf)

    def accept(self, token: int) -> None:
        """Advance past a token chosen from the masked logits."""
        if not self._matcher.consume_token(int(token)):
            self._check()

    def allowed_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens`, in order from the current state, the grammar allows (state unchanged)."""
        return int(self._matcher.validate_tokens([int(t) for t in tokens])) if len(tokens) else 0

    @property
    def complete(self) -> bool:
        """The grammar is satisfied and allows nothing more than a stop token."""
        return self._matcher.is_stopped()

    def _check(self) -> None:
        if self._matcher.is_error():  # the mask makes this unreachable; if it happens, say so loudly
            raise RuntimeError(f"grammar constraint failed: {self._matcher.get_error()}")
