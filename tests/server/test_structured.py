"""Structured outputs and logprobs through the real server on a tiny fp32 bundle, with the stock
clients: openai's `chat.completions.parse` with a pydantic model, LangChain's `with_structured_output`,
and raw requests for the error and logprobs shapes (streamed and not)."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from pydantic import BaseModel, Field

from minicpmo.runtime.pipeline import Pipeline
from server_helpers import running_server, sse_events

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["label", "count", "tags"],
          "properties": {"label": {"enum": ["cat", "dog", "bird"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 20},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}}}


class Part(BaseModel):
    name: str = Field(max_length=10)
    weight: float


class Receipt(BaseModel):
    shop: str = Field(max_length=12)
    currency: Literal["EUR", "USD"]
    parts: list[Part] = Field(max_length=3)
    paid: bool


@pytest.fixture(scope="module")
def server(fp32_bundle):
    with running_server(Pipeline.load(fp32_bundle, provider="cpu")) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def _model(client) -> str:
    return client.models.list().data[0].id


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "animal", "schema": schema, "strict": True}}


@pytest.mark.parametrize("seed", [1, 2])
def test_openai_parse_with_a_pydantic_model(client, seed):
    completion = client.chat.completions.parse(
        model=_model(client), messages=[{"role": "user", "content": "Read the receipt."}],
        response_format=Receipt, temperature=1.0, seed=seed, max_tokens=400)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Receipt)  # parsed and validated by the client itself


def test_openai_stream_with_a_pydantic_model(client):
    with client.chat.completions.stream(
            model=_model(client), messages=[{"role": "user", "content": "Read the receipt."}],
            response_format=Receipt, temperature=1.0, seed=5, max_tokens=400) as stream:
        completion = stream.get_final_completion()
    assert isinstance(completion.choices[0].message.parsed, Receipt)


def test_langchain_with_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=f"{server[0]}/v1", api_key="unused", model="x", max_retries=0,
                                      temperature=1.0, seed=3, max_tokens=400)
    llm.model_name = _model(openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused"))
    result = llm.with_structured_output(Receipt).invoke("Read the receipt.")
    assert isinstance(result, Receipt)


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_reply_validates(client, stream):
    kwargs = dict(model=_model(client), messages=[{"role": "user", "content": "Which animal?"}], temperature=1.0,
                  seed=4, max_tokens=300, response_format=_schema_format(SCHEMA))
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    else:
        text = client.chat.completions.create(**kwargs).choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)


def test_lookup_with_a_schema_is_still_valid(client):
    reply = client.chat.completions.create(
        model=_model(client), messages=[{"role": "user", "content": "Which animal?"}], temperature=0,
        max_tokens=300, response_format=_schema_format(SCHEMA), extra_body={"lookup": 4})
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)


def test_unsupported_schema_feature_is_a_400_naming_it(client):
    schema = {"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=_model(client), messages=[{"role": "user", "content": "x"}],
                                       response_format=_schema_format(schema))
    assert e.value.body["code"] == "unsupported_schema_feature"
    assert e.value.body["param"] == "response_format.json_schema.schema"
    assert "uniqueItems" in e.value.body["message"]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def _request(url: str, **body) -> httpx.Response:
    body = {"model": "x", "messages": [{"role": "user", "content": "Count to three."}], "temperature": 0,
            "max_tokens": 8, "logprobs": True, "top_logprobs": 3, **body}
    with httpx.Client(timeout=60) as http:
        body["model"] = http.get(f"{url}/v1/models").json()["data"][0]["id"]
        return http.post(f"{url}/v1/chat/completions", json=body)


def test_logprobs_shape_and_values(server):
    url, state = server
    r = _request(url)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] - (choice["finish_reason"] == "stop")
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(entry["top_logprobs"]) == 3
        assert all(set(t) == {"token", "logprob", "bytes"} for t in entry["top_logprobs"])
    assert bytes(b for e in content for b in e["bytes"]).decode("utf-8", "replace") == choice["message"]["content"]
    # greedy: each chosen token is the best of its step, and its logprob is the first token's log-softmax
    pipe = state.worker.pipeline
    first, _ = pipe.prompt_logits([{"role": "user", "content": "Count to three."}], cache_prompt=False)
    lsm = _log_softmax(first)
    assert content[0]["logprob"] == pytest.approx(lsm.max(), abs=1e-4)
    assert [t["logprob"] for t in content[0]["top_logprobs"]] == pytest.approx(np.sort(lsm)[::-1][:3], abs=1e-4)


def test_streamed_logprobs_equal_the_plain_ones(server):
    url, _ = server
    plain = _request(url).json()["choices"][0]["logprobs"]["content"]
    events = [e for e in sse_events(_request(url, stream=True).text) if isinstance(e, dict) and e["choices"]]
    streamed = [t for e in events if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["content"]]
    assert streamed == plain


def test_no_logprobs_unless_asked(server):
    r = _request(server[0], logprobs=None, top_logprobs=None)
    assert r.json()["choices"][0]["logprobs"] is None
