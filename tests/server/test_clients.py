"""What real clients send: the `openai` client and LangChain's `langchain-openai` against a real uvicorn
server on a FakePipeline; fields of other OpenAI-compatible servers; served names, CORS, the request log."""

from __future__ import annotations

import json
import logging

import pytest

from server_helpers import FakePipeline, data_uri, make_image, reply_for, running_server, started_client

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server():
    fake = FakePipeline()
    with running_server(fake, served_model_names=("minicpmo", "gpt-4o-mini"), default_max_tokens=5) as (url, _):
        yield url, fake


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=20)


def test_served_names_are_aliases_and_the_first_is_reported(server, oai):
    _, fake = server
    assert [m.id for m in oai.models.list()] == ["minicpmo", "gpt-4o-mini"]
    r = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert r.model == "minicpmo"
    assert fake.calls[-1][1].max_tokens == 5 and r.choices[0].finish_reason == "length"  # the server default
    with pytest.raises(openai.NotFoundError, match="'minicpmo', 'gpt-4o-mini'"):
        oai.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])


def test_fields_other_servers_take(server, oai):
    _, fake = server
    img = make_image(4)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "what is it?", "cache_control": {"type": "ephemeral"}},
        {"type": "image_url", "image_url": data_uri(img)},  # a bare string, as vLLM accepts
        {"type": "image_url", "image_url": {"url": data_uri(img), "detail": "low"}},
    ]}]
    r = oai.chat.completions.create(model="minicpmo", messages=messages, temperature=0.5, extra_body={
        "min_p": 0.05, "repeat_penalty": 1.1, "top_k": 40, "id_slot": 0, "provider": {"order": ["x"]}})
    assert r.choices[0].message.content
    decoded, params = fake.calls[-1]
    parts = decoded[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image", "image"]
    assert "max_slices" not in parts[1] and parts[2]["max_slices"] == 1  # detail "low": one slice
    assert (params.min_p, params.repetition_penalty, params.top_k) == (0.05, 1.1, 40)
    with pytest.raises(openai.BadRequestError, match="repeat_penalty and repetition_penalty"):
        oai.chat.completions.create(model="minicpmo", messages=messages,
                                    extra_body={"repeat_penalty": 1.1, "repetition_penalty": 1.2})
    with pytest.raises(openai.BadRequestError, match="min_p"):
        oai.chat.completions.create(model="minicpmo", messages=messages, extra_body={"min_p": "0.1"})


def test_a_tool_using_history_is_accepted(server, oai):
    _, fake = server
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
        {"role": "user", "content": "So, a jacket?"},
    ]
    oai.chat.completions.create(model="minicpmo", messages=messages)
    decoded = fake.calls[-1][0]
    assert [m["role"] for m in decoded] == ["user", "assistant", "tool", "user"]
    call = decoded[1]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}  # parsed for the template
    assert decoded[2]["content"] == "22 C, sunny"
    with pytest.raises(openai.BadRequestError, match="tools"):  # offering tools is still refused
        oai.chat.completions.create(model="minicpmo", messages=messages[:1],
                                    tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_langchain_chat_openai(server):
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

    url, fake = server
    llm = lc.ChatOpenAI(model="minicpmo", base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20,
                        temperature=0, max_tokens=6)
    messages = [SystemMessage("be brief"), HumanMessage("hello")]
    reply = llm.invoke(messages)
    decoded = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert reply.content == reply_for(decoded, 6)
    assert reply.response_metadata["finish_reason"] == "length"
    assert reply.usage_metadata["output_tokens"] == 6
    streamed = "".join(chunk.content for chunk in llm.stream(messages))
    assert streamed == reply_for(decoded, 6)
    img = make_image(5)
    llm.invoke([HumanMessage(content=[{"type": "text", "text": "what?"},
                                      {"type": "image_url", "image_url": {"url": data_uri(img)}}])])
    assert [p["type"] for p in fake.calls[-1][0][0]["content"]] == ["text", "image"]
    history = [HumanMessage("Weather?"),
               AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Oslo"}, "id": "c1"}]),
               ToolMessage("3 C", tool_call_id="c1"), HumanMessage("Coat?")]
    llm.invoke(history)
    decoded = fake.calls[-1][0]
    assert decoded[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert decoded[2] == {"role": "tool", "content": "3 C"}


def test_cors_preflight_and_headers():
    with started_client(FakePipeline(), cors_origins=("http://localhost:3000",)) as c:
        r = c.options("/v1/chat/completions", headers={"Origin": "http://localhost:3000",
                                                       "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "authorization"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = c.get("/health", headers={"Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in r.headers
    with started_client(FakePipeline()) as c:  # off by default
        r = c.get("/health", headers={"Origin": "http://localhost:3000"})
        assert "access-control-allow-origin" not in r.headers


def test_every_error_is_logged_with_its_reason_and_request_id(caplog):
    with started_client(FakePipeline(), api_key="k") as c, caplog.at_level(logging.INFO, "minicpmo.server"):
        auth = {"Authorization": "Bearer k"}
        cases = [
            (c.post("/v1/chat/completions", json={"model": "fake-model", "messages": []}, headers=auth),
             "invalid_value (messages):"),
            (c.post("/v1/chat/completions", json={"model": "fake-model", "messages": [{"role": "user",
                    "content": "x"}], "max_token": 3}, headers=auth), "unknown_field (max_token): unknown field"),
            (c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
                    headers=auth), "model_not_found (model): The model 'nope' does not exist"),
            (c.get("/v1/models"), "invalid_api_key: Incorrect or missing API key"),
            (c.post("/v1/chat/completions", json={"model": "fake-model", "messages": [{"role": "user",
                    "content": "RAISE_INPUT"}]}, headers=auth), "invalid_request (messages): the fake refuses"),
        ]
        lines = [r.getMessage() for r in caplog.records if r.name == "minicpmo.server"]
    for response, reason in cases:
        request_id = response.headers["x-request-id"]
        line = next(line for line in lines if line.startswith(request_id + " "))
        assert f" {response.status_code} " in line and f"error={reason}" in line, line
    ok = [line for line in lines if " 200 " in line]
    assert all("error=" not in line for line in ok)


def test_ignored_fields_are_logged_once_at_debug(caplog, monkeypatch):
    from minicpmo.runtime.server import schemas

    monkeypatch.setattr(schemas, "_logged_ignored", set())
    with started_client(FakePipeline()) as c, caplog.at_level(logging.DEBUG, "minicpmo.runtime.server.schemas"):
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "route": "fallback",
                "transforms": ["middle-out"]}
        for _ in range(2):
            assert c.post("/v1/chat/completions", json=body).status_code == 200
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    for name in ("route", "transforms"):
        assert sum(f"'{name}'" in m for m in ignored) == 1  # once per process


def test_health_is_open_while_the_api_needs_the_key():
    with started_client(FakePipeline(), api_key="k") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200


def test_docs_are_served():
    with started_client(FakePipeline()) as c:
        assert c.get("/docs").status_code == 200
        schema = c.get("/openapi.json").json()
        assert "/v1/chat/completions" in schema["paths"]


def test_bind_errors_are_one_line():
    import socket

    from minicpmo.runtime.errors import MiniCPMOError
    from minicpmo.runtime.server.app import bind_socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MiniCPMOError, match=f"port {port} on 127.0.0.1 is already in use"):
            bind_socket("127.0.0.1", port)
    with pytest.raises(MiniCPMOError, match="--host no.such.host.invalid"):
        bind_socket("no.such.host.invalid", 0)
    sock = bind_socket("127.0.0.1", 0)
    try:
        with socket.create_connection(sock.getsockname()[:2], timeout=2):
            pass
    finally:
        sock.close()
