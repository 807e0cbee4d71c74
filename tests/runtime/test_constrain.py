"""Structured outputs and logprobs on a tiny fp32 bundle.

Random weights make the content random; the grammar alone makes it valid, so a reply that parses and
validates against its schema is evidence of the constraint, for every seed. Strings and arrays are
bounded (maxLength, maxItems) so that a random model closes them within max_tokens.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from minicpmo.runtime.constrain import GrammarVocabulary, grammar_for
from minicpmo.runtime.errors import InputError
from minicpmo.runtime.generate import StepStats, generate_tokens
from minicpmo.runtime.pipeline import Pipeline
from minicpmo.runtime.sampler import make_sampler, top_logprobs
from minicpmo.runtime.types import GenerationParams

MESSAGES = [{"role": "user", "content": "Describe the person in the photo as JSON."}]
SHORT = {"type": "string", "maxLength": 12}
SCHEMAS = {
    "nested objects": {
        "type": "object", "additionalProperties": False, "required": ["name", "address"],
        "properties": {"name": SHORT, "address": {
            "type": "object", "additionalProperties": False, "required": ["city", "zip"],
            "properties": {"city": SHORT, "zip": {"type": "integer", "minimum": 1000, "maximum": 99999}}}}},
    "arrays and enums": {
        "type": "object", "additionalProperties": False, "required": ["colors", "sizes"],
        "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
                       "sizes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                 "minItems": 1, "maxItems": 3}}},
    "numbers and optional fields": {
        "type": "object", "additionalProperties": False, "required": ["price", "in_stock"],
        "properties": {"price": {"type": "number"}, "in_stock": {"type": "boolean"}, "note": SHORT,
                       "rating": {"type": "integer", "minimum": -5, "maximum": 5}}},
    "refs (pydantic style)": {
        "$defs": {"Item": {"type": "object", "additionalProperties": False, "required": ["sku", "qty"],
                           "properties": {"sku": SHORT, "qty": {"type": "integer", "minimum": 1, "maximum": 99}}}},
        "type": "object", "additionalProperties": False, "required": ["items"],
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 3}}},
}


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def pipe(fp32_bundle) -> Pipeline:
    return Pipeline.load(fp32_bundle, provider="cpu")


def _reply(pipe, params):
    chunks = list(pipe.generate(MESSAGES, params))
    return "".join(c.text for c in chunks), chunks


@pytest.mark.parametrize("name", SCHEMAS)
@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 1), (1.0, 2)])
def test_reply_validates_against_its_schema(pipe, name, temperature, seed):
    schema = SCHEMAS[name]
    params = GenerationParams(max_tokens=400, temperature=temperature, seed=seed,
                              response_format=json_schema_format(schema))
    text, chunks = _reply(pipe, params)
    assert chunks[-1].finish_reason == "stop", text  # the grammar ended the reply, not max_tokens
    jsonschema.validate(json.loads(text), schema)


def test_json_object_reply_is_an_object(pipe):
    # an open object lets a random model ramble: a cut reply must still be a prefix the grammar allows
    text, chunks = _reply(pipe, GenerationParams(max_tokens=60, temperature=1.0, seed=0,
                                                 response_format={"type": "json_object"}))
    assert text.startswith("{")
    if chunks[-1].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_unconstrained_reply_is_not_json(pipe):
    """The control: the same model without a format does not write JSON by itself."""
    text, _ = _reply(pipe, GenerationParams(max_tokens=40, temperature=1.0, seed=1))
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize("keyword,schema", [
    ("uniqueItems", {"type": "array", "uniqueItems": True}),
    ("not", {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
])
def test_unsupported_schema_feature_is_named(keyword, schema):
    with pytest.raises(InputError) as e:
        grammar_for(json_schema_format(schema))
    assert keyword in str(e.value)
    assert e.value.code == "unsupported_schema_feature"


@pytest.mark.parametrize("schema, reason", [
    ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum"),
    ({"type": "string", "pattern": "["}, "unclosed character class"),
    ({"$ref": "#/$defs/Missing"}, "/$defs/Missing"),
])
def test_wrong_or_unsatisfiable_schema_says_why_in_one_line(schema, reason):
    with pytest.raises(InputError) as e:
        grammar_for(json_schema_format(schema))
    assert reason in str(e.value) and "\n" not in str(e.value)
    assert e.value.code == "invalid_json_schema"


@pytest.mark.parametrize("response_format", [
    {"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": []}}, "json",
])
def test_malformed_response_format_is_an_input_error(response_format):
    with pytest.raises(InputError):
        grammar_for(response_format)


def test_text_format_means_no_grammar():
    assert grammar_for(None) is None and grammar_for({"type": "text"}) is None


def test_json_schema_without_a_schema_allows_any_json():
    assert grammar_for({"type": "json_schema", "json_schema": {"name": "any", "schema": None}}) is not None
    assert grammar_for({"type": "json_schema", "json_schema": {"name": "any"}}) is not None


def test_lookup_with_a_schema_gives_the_same_valid_reply(pipe):
    """Drafts are verified, and cut where the grammar rejects them: in fp32 the reply is plain decoding's.
    (That drafts are fed, and only what the grammar allows, is tested below with a scripted chooser.)"""
    schema = SCHEMAS["arrays and enums"]
    base = GenerationParams(max_tokens=300, response_format=json_schema_format(schema))
    plain, _ = _reply(pipe, base)
    drafted, chunks = _reply(pipe, GenerationParams(**{**base.__dict__, "lookup": 4}))
    assert drafted == plain
    jsonschema.validate(json.loads(drafted), schema)


def test_draft_allowed_cuts_at_the_first_rejected_token(pipe):
    grammar = GrammarVocabulary(pipe.tokenizer.path.read_text(), pipe.manifest["decoder"]["vocab_size"],
                                pipe.stop_ids)
    sampler = make_sampler(GenerationParams(), constraint=grammar.constraint(
        json_schema_format({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                            "additionalProperties": False})))
    valid = pipe.tokenizer.encode('{"a":12}')
    assert sampler.draft_allowed(valid) == len(valid)
    assert sampler.draft_allowed(valid[:-1] + pipe.tokenizer.encode("x")) == len(valid) - 1
    assert sampler.draft_allowed(pipe.tokenizer.encode("[")) == 0


def test_generate_tokens_feeds_only_allowed_drafts(pipe):
    """The loop feeds only the part of a draft that `draft_allowed` passes. A scripted chooser repeats
    the prompt, so the draft finder always has a draft to offer."""
    ids, embeds, keys, _, _ = pipe._prepare(MESSAGES, GenerationParams(max_tokens=24))
    script = [int(t) for t in ids[-12:]] * 3

    def scripted(logits, history, n_prompt):
        return script[len(history) - n_prompt]

    def run(draft_allowed):
        stats = StepStats()
        out = list(generate_tokens(pipe.decoder, pipe.embed, embeds, keys, ids, scripted, 24, set(), stats,
                                   lookup=4, draft_allowed=draft_allowed))
        return out, stats

    free, free_stats = run(None)
    none, none_stats = run(lambda draft: 0)
    one, one_stats = run(lambda draft: min(len(draft), 1))
    assert free == none == one == script[:24]
    assert free_stats.draft_tokens > one_stats.draft_tokens > none_stats.draft_tokens == 0
    assert one_stats.accepted_draft_tokens == one_stats.draft_tokens  # the one token let through was right


def _fp32_logits(pipe, prompt_ids: np.ndarray, reply_ids: list[int]) -> np.ndarray:
    """[len(reply), V]: a fresh forward over prompt + reply, the logits each reply token was drawn from."""
    pipe.kv.reset()
    embeds = pipe.embed(np.concatenate([prompt_ids, reply_ids[:-1]]))
    keys = [int(t) for t in prompt_ids] + [int(t) for t in reply_ids[:-1]]
    n = len(prompt_ids)
    first = pipe.decoder.prefill(embeds[:n], keys[:n]).copy()
    rest = pipe.decoder.forward_all(embeds[n:], keys[n:]) if len(reply_ids) > 1 else np.zeros((0, len(first)))
    return np.concatenate([first[None], np.asarray(rest)])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


@pytest.mark.parametrize("response_format", [None, json_schema_format(SCHEMAS["nested objects"])])
def test_logprobs_are_the_log_softmax_of_the_model_logits(pipe, response_format):
    params = GenerationParams(max_tokens=30, temperature=1.0, seed=5, logprobs=True, top_logprobs=5,
                              response_format=response_format)
    text, chunks = _reply(pipe, params)
    reply = [t for c in chunks for t in c.token_ids]
    entries = [e for c in chunks for e in c.logprobs or ()]
    stop = chunks[-1].finish_reason == "stop"
    assert [e.token_id for e in entries] == reply[:len(reply) - stop]  # a stop token has no entry
    expected = _fp32_logits(pipe, np.asarray(pipe.last_prompt_ids), reply)
    for row, e in zip(expected, entries, strict=False):
        lsm = _log_softmax(row)
        assert e.logprob == pytest.approx(lsm[e.token_id], abs=1e-4)
        assert len(e.top) == 5
        tops = [t.logprob for t in e.top]
        assert tops == sorted(tops, reverse=True)
        for t in e.top:
            assert t.logprob == pytest.approx(lsm[t.token_id], abs=1e-4)
        assert tops[-1] >= np.sort(lsm)[-5] - 1e-4  # these are the five best, up to fp32 near-ties
    assert b"".join(e.bytes for e in entries).decode("utf-8", errors="replace") == text


def test_top_logprobs_bound():
    with pytest.raises(InputError, match="top_logprobs"):
        make_sampler(GenerationParams(logprobs=True, top_logprobs=21))


def test_logprobs_of_drafted_rows_equal_plain_decoding(pipe):
    """A verify step's rows give the logprobs one-position steps give (fp32, up to summation order).
    A scripted chooser repeats the prompt, so drafts are fed and kept."""
    ids, embeds, keys, _, _ = pipe._prepare(MESSAGES, GenerationParams(max_tokens=24))
    script = [int(t) for t in ids[-12:]] * 3

    def run(lookup):
        recorded, stats = [], StepStats()

        def scripted(logits, history, n_prompt):
            token = script[len(history) - n_prompt]
            recorded.append(top_logprobs(logits, token, 3))
            return token
        list(generate_tokens(pipe.decoder, pipe.embed, embeds, keys, ids, scripted, 24, set(), stats, lookup=lookup))
        return recorded, stats

    plain, _ = run(0)
    drafted, stats = run(4)
    assert stats.accepted_draft_tokens > 0
    assert [lp for lp, _ in drafted] == pytest.approx([lp for lp, _ in plain], abs=1e-4)
    assert [v for _, top in drafted for _, v in top] == pytest.approx([v for _, top in plain for _, v in top], abs=1e-4)
