"""Bounded property-based fuzzing: whatever a client sends, the server answers without a 5xx.

1. schemathesis generates requests (valid and invalid) from the app's own OpenAPI document;
2. hypothesis posts arbitrary JSON documents and mutated valid bodies.
Image URLs are disabled on the fuzzed app, so nothing leaves the machine.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minicpmo.runtime.server import ServerSettings, create_app
from server_helpers import FakePipeline, data_uri, make_image, started_client

schemathesis = pytest.importorskip("schemathesis")

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much])


def _fuzz_app():
    return create_app(FakePipeline(), ServerSettings(allow_urls=False, max_images_per_request=4))


schema = schemathesis.openapi.from_asgi("/openapi.json", _fuzz_app())


@schema.parametrize()
@FUZZ
def test_schema_fuzz_never_5xx(case):
    _check(case.call(), case)
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "fake-model"  # also reach generation, not only the 404 for a random name
        _check(case.call(), case)


def _check(response, case) -> None:
    assert response.status_code < 500, (case.path, response.text)
    if response.status_code >= 400:
        error = json.loads(response.text)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
VALID = {"model": "fake-model", "max_tokens": 3,
         "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(make_image(1))}},
                                                   {"type": "text", "text": "hi"}]}]}
KEYS = ["model", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "n", "stream", "seed",
        "stream_options", "max_completion_tokens", "repetition_penalty", "frequency_penalty", "tools"]


@pytest.fixture(scope="module")
def fuzz_client():
    with started_client(FakePipeline(), allow_urls=False) as client:
        yield client


@FUZZ
@given(body=JSON)
def test_arbitrary_json_never_5xx(fuzz_client, body):
    r = fuzz_client.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json(), r.text


@FUZZ
@given(key=st.sampled_from(KEYS), value=JSON, path=st.sampled_from(["top", "message", "part", "url"]))
def test_mutated_valid_body_never_5xx(fuzz_client, key, value, path):
    body = json.loads(json.dumps(VALID))
    if path == "top":
        body[key] = value
    elif path == "message":
        body["messages"][0][key if key != "model" else "role"] = value
    elif path == "part":
        body["messages"][0]["content"][1]["text" if key != "model" else "type"] = value
    else:
        body["messages"][0]["content"][0]["image_url"]["url"] = value
    r = fuzz_client.post("/v1/chat/completions", json=body)
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}

