"""Queueing, cancellation and isolation on a real uvicorn server with a slow FakePipeline."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server_helpers import FakePipeline, reply_for, running_server, sse_events, wait_until

STEP = 0.2  # seconds per fake decode step; a full reply (16 tokens) takes 3.2 s


def body(text: str, **kw) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": text}], **kw}


class OpenStream:
    """A streaming request read up to its first content chunk, kept open until close()."""

    def __init__(self, url: str, text: str):
        self.client = httpx.Client(timeout=10)
        request = self.client.build_request("POST", f"{url}/v1/chat/completions", json=body(text, stream=True))
        self.response = self.client.send(request, stream=True)
        assert self.response.status_code == 200
        # keep the iterator referenced: dropping it makes httpx close the connection
        self.lines = self.response.iter_lines()
        for line in self.lines:
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                break

    def close(self) -> None:
        self.response.close()
        self.client.close()


def test_disconnect_mid_stream_closes_the_generation_and_frees_the_worker():
    fake = FakePipeline(step_delay=STEP)
    with running_server(fake) as (url, state):
        stream = OpenStream(url, "first")
        t0 = time.monotonic()
        stream.close()
        assert fake.closed_event.wait(2.0), "the generator was not closed after the client left"
        assert time.monotonic() - t0 < 1.5  # within one decode step (+ detection), not the 3 s left
        assert fake.closed_early == ["user:text:first"]
        r = httpx.post(f"{url}/v1/chat/completions", json=body("second", max_tokens=2), timeout=5)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == reply_for(
            [{"role": "user", "content": "second"}], 2)
        assert time.monotonic() - t0 < 2.5
        assert 'minicpmo_generations_cancelled_total 1' in httpx.get(f"{url}/metrics").text


def test_non_streaming_client_that_gives_up_stops_its_generation():
    fake = FakePipeline(step_delay=STEP)
    with running_server(fake) as (url, state):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body("impatient"), timeout=0.4)
        assert fake.closed_event.wait(2.0)
        assert wait_until(lambda: state.worker.running == 0, 2.0)


def test_queue_full_is_429_with_retry_after_and_queued_clients_can_leave():
    fake = FakePipeline(step_delay=STEP)
    with running_server(fake, max_queue=1) as (url, state):
        running = OpenStream(url, "A")
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body("B", max_tokens=1), timeout=10)
            assert wait_until(lambda: state.worker.waiting == 1, 3.0)
            r = httpx.post(f"{url}/v1/chat/completions", json=body("C"), timeout=5)
            assert r.status_code == 429, r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
            running.close()
            assert queued.result(timeout=5).status_code == 200
        # a queued client that leaves never reaches the model
        running = OpenStream(url, "D")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body("E"), timeout=0.3)
        assert state.worker.running == 1  # D is still generating
        running.close()
        assert wait_until(lambda: state.worker.waiting == 0 and state.worker.running == 0, 3.0)
        assert all("E" not in m[0]["content"] for m, _ in fake.calls), [m[0]["content"] for m, _ in fake.calls]


def test_a_failing_request_does_not_disturb_the_others():
    fake = FakePipeline(step_delay=0.01)
    with running_server(fake) as (url, _):
        prompts = ["ok 1", "CRASH", "ok 2", "RAISE_INPUT", "ok 3", "LONG " * 300, "ok 4"]

        def send(text: str) -> httpx.Response:
            return httpx.post(f"{url}/v1/chat/completions", json=body(text, stream=True), timeout=20)

        with ThreadPoolExecutor(len(prompts)) as pool:
            responses = dict(zip(prompts, pool.map(send, prompts), strict=True))
        for text, r in responses.items():
            if text.startswith("ok"):
                events = sse_events(r.text)
                got = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
                assert got == reply_for([{"role": "user", "content": text}])
        assert responses["CRASH"].status_code == 500
        assert responses["RAISE_INPUT"].status_code == 400
        assert responses["LONG " * 300].json()["error"]["code"] == "context_length_exceeded"


def test_request_timeout():
    fake = FakePipeline(step_delay=STEP)
    with running_server(fake, request_timeout=0.5) as (url, state):
        r = httpx.post(f"{url}/v1/chat/completions", json=body("slow"), timeout=5)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert fake.closed_event.wait(2.0)
        fake.closed_event.clear()
        r = httpx.post(f"{url}/v1/chat/completions", json=body("slow stream", stream=True), timeout=5)
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout"
        assert fake.closed_event.wait(2.0)


def test_server_logs_one_line_per_request(caplog):
    fake = FakePipeline()
    with caplog.at_level("INFO", logger="minicpmo.server"), running_server(fake) as (url, _):
        r = httpx.post(f"{url}/v1/chat/completions", json=body("log me", max_tokens=3), timeout=5)
        request_id = r.json()["id"]
        assert wait_until(lambda: any(request_id in rec.getMessage() for rec in caplog.records), 2.0)
    lines = [rec.getMessage() for rec in caplog.records if request_id in rec.getMessage()]
    assert len(lines) == 1, lines
    assert "completion_tokens=3" in lines[0] and "prompt_tokens=" in lines[0] and "latency=" in lines[0]
    assert " 200 " in lines[0]


def test_stream_json_is_valid_per_line():
    """Every SSE data line is one JSON document (no line breaks inside), as SSE parsers require."""
    fake = FakePipeline()
    with running_server(fake) as (url, _):
        r = httpx.post(f"{url}/v1/chat/completions", json=body("multi\nline", stream=True), timeout=5)
        for line in r.text.split("\n\n"):
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[len("data: "):])
        assert threading.active_count() < 50
