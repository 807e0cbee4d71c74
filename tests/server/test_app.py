"""In-process tests (TestClient) of create_app on a FakePipeline: shapes, parameters, every error path."""

from __future__ import annotations

import base64
import io
import struct
import threading
import wave
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from minicpmo.runtime.errors import BundleError, MiniCPMOError
from minicpmo.runtime.server import ServerSettings, create_app, serve
from server_helpers import (
    N_REPLY_TOKENS,
    FakePipeline,
    b64,
    image_part,
    make_image,
    png_bytes,
    reply_for,
    sse_events,
    started_client,
    user,
    wait_until,
)

URL = "/v1/chat/completions"


def chat(client, messages, **kw):
    return client.post(URL, json={"model": "fake-model", "messages": messages, **kw})


def assert_error(r, status: int, code: str | None = None, param: str | None = None, text: str | None = None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["message"] and "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    if text is not None:
        assert text in err["message"], err
    return err


# -- success shapes ---------------------------------------------------------------------------------

def test_non_streaming_response_shape(client):
    r = chat(client, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "fake-model"
    decoded = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": reply_for(decoded)},
                                "logprobs": None, "finish_reason": "stop"}]
    usage = body["usage"]
    assert usage["completion_tokens"] == N_REPLY_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("include_usage", [True, False])
def test_streaming_event_sequence(client, include_usage):
    img = make_image(3)
    r = chat(client, [user(img, "what is it?")], stream=True, max_tokens=5,
             stream_options={"include_usage": include_usage})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
        chunks = chunks[:-1]
    assert all(c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    decoded = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "what is it?"}]}]
    assert text == reply_for(decoded, 5)


def test_defaults_follow_openai(client, fake):
    assert chat(client, [{"role": "user", "content": "x"}]).status_code == 200
    params = fake.calls[-1][1]
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 1.0, 0)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.0, 0.0, 1.0)
    assert params.max_tokens == fake.context_length and params.seed is None and params.stop == ()
    assert params.lookup == 0 and params.cache_prompt


def test_lookup_comes_from_the_request_or_the_server_default(fake):
    with started_client(fake, default_lookup=3) as c:
        assert chat(c, [{"role": "user", "content": "x"}]).status_code == 200
        assert fake.calls[-1][1].lookup == 3
        assert chat(c, [{"role": "user", "content": "x"}], lookup=0).status_code == 200
        assert fake.calls[-1][1].lookup == 0


def test_parameters_are_mapped(client, fake):
    r = chat(client, [{"role": "developer", "content": "sys"}, {"role": "user", "content": "x"}],
             temperature=0, top_p=0.5, top_k=-1, frequency_penalty=0.5, presence_penalty=-0.5,
             repetition_penalty=1.2, seed=7, stop="END", max_tokens=9, max_completion_tokens=3, n=1,
             user="someone", response_format={"type": "text"}, tool_choice="none")
    assert r.status_code == 200, r.text
    messages, params = fake.calls[-1]
    assert messages[0]["role"] == "system"
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.0, 0.5, 0, 7)
    assert (params.frequency_penalty, params.presence_penalty, params.repetition_penalty) == (0.5, -0.5, 1.2)
    assert params.stop == ("END",) and params.max_tokens == 3 and params.lookup == 0
    assert r.json()["usage"]["completion_tokens"] == 3
    chat(client, [{"role": "user", "content": "x"}], stop=["a", "b"], max_tokens=4)
    assert fake.calls[-1][1].stop == ("a", "b") and fake.calls[-1][1].max_tokens == 4


def test_images_across_turns_and_raw_base64(client, fake):
    a, b, c = make_image(1), make_image(2), make_image(3, (30, 20))
    messages = [user(a, image_part(b64(b)), "two images"), {"role": "assistant", "content": "ok"},
                user(c, "and this")]
    r = chat(client, messages, max_tokens=4)
    assert r.status_code == 200, r.text
    decoded = fake.calls[-1][0]
    images = [p["image"] for m in decoded if isinstance(m["content"], list) for p in m["content"]
              if p["type"] == "image"]
    assert [im.tobytes() for im in images] == [a.tobytes(), b.tobytes(), c.tobytes()]
    assert r.json()["choices"][0]["message"]["content"] == reply_for(decoded, 4)


def test_models_and_health(client):
    assert client.get("/health").json() == {"status": "ok", "model": "fake-model"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["fake-model"]
    assert models["data"][0]["context_length"] == FakePipeline.context_length
    assert client.get("/v1/models/fake-model").json()["id"] == "fake-model"
    assert_error(client.get("/v1/models/other"), 404, "model_not_found")


def test_metrics_count_requests_tokens_and_latency(client):
    chat(client, [{"role": "user", "content": "x"}], max_tokens=2)
    chat(client, [{"role": "user", "content": "x"}], n=3)
    text = client.get("/metrics").text
    assert 'minicpmo_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in text
    assert 'minicpmo_requests_total{endpoint="/v1/chat/completions",status="400"} 1' in text
    assert "minicpmo_completion_tokens_total 2" in text
    assert "minicpmo_queue_depth 0" in text and "minicpmo_model_loaded 1" in text
    assert "minicpmo_request_latency_seconds_count 2" in text
    assert 'minicpmo_time_to_first_token_seconds_bucket{le="+Inf"} 1' in text


# -- errors -----------------------------------------------------------------------------------------

BAD_BODIES = [
    # (raw body or JSON object, status, code, param)
    ("{bad json", 400, "invalid_json", None),
    ("", 400, None, None),
    ([1, 2], 400, "invalid_request", None),
    ({"model": "fake-model"}, 400, "missing_field", "messages"),
    ({"model": "fake-model", "messages": []}, 400, "invalid_value", "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "missing_field", "model"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400,
     "invalid_value", "temperature"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400,
     "invalid_value", "temperature"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}, 400,
     "invalid_value", "max_tokens"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "lookup": 17}, 400,
     "invalid_value", "lookup"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400,
     "invalid_value", "max_tokens"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400,
     "invalid_value", "stream"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_token": 5}, 400,
     "unknown_field", "max_token"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": 5}]}, 400, "invalid_value",
     "messages[0].content"),
    ({"model": "fake-model", "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value", "messages[0]"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x", "colour": 1}]}, 400, "unknown_field",
     "messages[0].colour"),
    ({"model": "fake-model", "messages": [user({"type": "image_url", "image_url": {"url": 5}})]}, 400,
     "invalid_value", "messages[0].content[0].image_url.url"),
    ({"model": "fake-model", "messages": [user({"type": "video", "video": "x"})]}, 400, "invalid_value",
     "messages[0].content[0]"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400,
     "unsupported_parameter", "n"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "unsupported_parameter", "tools"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "invalid_value", "top_logprobs"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     400, "invalid_value", "top_logprobs"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     400, "invalid_value", "response_format"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, 400, "missing_field",
     "response_format.json_schema.name"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     400, "unsupported_schema_feature", "response_format.json_schema.schema"),
    ({"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found", "model"),
]


@pytest.mark.parametrize("body, status, code, param", BAD_BODIES)
def test_bad_requests_get_openai_errors(client, body, status, code, param):
    if isinstance(body, str):
        r = client.post(URL, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(URL, json=body)
    assert_error(r, status, code, param)


def test_misspelled_part_field_reports_both_problems(client):
    r = chat(client, [user({"type": "image_url", "imageurl": {"url": "x"}})])
    err = assert_error(r, 400, param="messages[0].content[0].image_url")
    assert "unknown field 'messages[0].content[0].imageurl'" in err["message"] and "is required" in err["message"]


def _url_message(url: str) -> list[dict]:
    return [user(image_part(url), "look")]


IMAGE_ERRORS = [
    ("data:image/png;base64,@@@notbase64@@@", "valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"plain text, not an image").decode(), "cannot identify image"),
    (base64.b64encode(b"plain text, not an image at all").decode(), "not an image"),
    ("%%% not anything %%%", "base64"),
    ("/etc/passwd", "--allowed-local-media"),
    ("file:///etc/passwd", "--allowed-local-media"),
    ("ftp://example.com/a.png", "unsupported URL scheme"),
    ("http://127.0.0.1:1/nothing-listens-here.png", "cannot"),
    ("http://", "no host"),
]


@pytest.mark.parametrize("url, text", IMAGE_ERRORS)
def test_bad_images_are_400(client, url, text):
    r = chat(client, _url_message(url))
    assert_error(r, 400, "invalid_image", "messages[0].content[0].image_url.url", text)


def test_truncated_png_is_400(client):
    data = png_bytes(make_image(1, (64, 64)))
    r = chat(client, _url_message("data:image/png;base64," + base64.b64encode(data[: len(data) // 2]).decode()))
    assert_error(r, 400, "invalid_image")


def test_image_limits(fake):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    assert len(png_bytes(noise)) > 3000  # noise does not compress
    with started_client(fake, max_image_pixels=5000, max_image_bytes=3000, max_images_per_request=2) as c:
        assert_error(chat(c, [user(make_image(1, (100, 100)))]), 400, "invalid_image", text="pixels")
        assert_error(chat(c, [user(noise)]), 400, "invalid_image", text="limit")
        three = [user(make_image(1), make_image(2), make_image(3))]
        assert_error(chat(c, three), 400, "too_many_images", "messages")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds almost no data (a decompression-bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header(client):
    bomb = base64.b64encode(_png_header_only(100_000, 100_000)).decode()
    err = assert_error(chat(client, _url_message("data:image/png;base64," + bomb)), 400, "invalid_image")
    assert "too large" in err["message"]
    under_pil_limit = base64.b64encode(_png_header_only(10_000, 5_000)).decode()  # 50 M > our 40 M pixels
    err = assert_error(chat(client, _url_message("data:image/png;base64," + under_pil_limit)), 400, "invalid_image")
    assert "10000x5000" in err["message"] and "limit" in err["message"]


def test_audio_part_is_a_clear_400(client):
    part = {"type": "input_audio", "input_audio": {"data": "!!!", "format": "wav"}}
    err = assert_error(chat(client, [user(part)]), 400)
    assert err["code"] in ("unsupported_audio", "invalid_audio")


def _wav_base64(seconds: float, rate: int = 16000) -> str:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x10" * int(seconds * rate))
    return base64.b64encode(buf.getvalue()).decode()


def test_audio_part_is_decoded_for_the_pipeline(client, fake):
    pytest.importorskip("minicpmo.runtime.preprocess.audio")
    pytest.importorskip("soundfile")
    pytest.importorskip("soxr")
    part = {"type": "input_audio", "input_audio": {"data": _wav_base64(0.25), "format": "wav"}}
    r = chat(client, [user(part, "what do you hear?")], max_tokens=2)
    assert r.status_code == 200, r.text
    audio = fake.calls[-1][0][0]["content"][0]
    assert audio["type"] == "audio" and audio["audio"].dtype == np.float32 and audio["audio"].shape == (4000,)
    bad = {"type": "input_audio", "input_audio": {"data": _wav_base64(0.1), "format": "midi"}}
    assert_error(chat(client, [user(bad)]), 400, param="messages[0].content[0].input_audio")


def test_pipeline_input_errors_are_400(client):
    assert_error(chat(client, [{"role": "user", "content": "RAISE_INPUT"}]), 400, "invalid_request", "messages")
    long = [{"role": "user", "content": "LONG " * 300}]
    assert_error(chat(client, long), 400, "context_length_exceeded", "messages")
    assert_error(chat(client, long, stream=True), 400, "context_length_exceeded")


def test_pipeline_crash_is_a_500_without_traceback_and_the_next_request_works(client):
    err = assert_error(chat(client, [{"role": "user", "content": "CRASH"}]), 500, "internal_error")
    assert "crashed" not in err["message"]  # internals stay in the server log
    assert chat(client, [{"role": "user", "content": "fine"}]).status_code == 200


def test_unknown_route_and_method(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get(URL), 405, "method_not_allowed")


def test_request_body_size_limit(fake):
    with started_client(fake, max_request_bytes=1000) as c:
        r = chat(c, [{"role": "user", "content": "x" * 2000}])
        assert_error(r, 413, "request_too_large")


def test_api_key(fake):
    with started_client(fake, api_key="sekret") as c:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
        assert_error(c.post(URL, json=body), 401, "invalid_api_key")
        assert_error(c.post(URL, json=body, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
        assert_error(c.post(URL, content="{bad", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.get("/v1/models"), 401)
        assert_error(c.get("/metrics"), 401)
        assert c.get("/health").status_code == 200
        auth = {"Authorization": "Bearer sekret"}
        assert c.post(URL, json=body, headers=auth).status_code == 200
        assert c.get("/v1/models", headers=auth).status_code == 200


def test_health_is_503_while_loading_then_200():
    release = threading.Event()

    def slow_factory():
        assert release.wait(10)
        return FakePipeline()


    app = create_app(slow_factory)
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        assert_error(chat(c, [{"role": "user", "content": "x"}]), 503, "model_loading")
        assert_error(c.get("/v1/models"), 503, "model_loading")
        release.set()
        assert wait_until(lambda: c.get("/health").status_code == 200, 5)
        assert chat(c, [{"role": "user", "content": "x"}]).status_code == 200


def test_failed_load_is_reported():
    def broken_factory():
        raise BundleError("manifest.json is missing")

    with started_client(broken_factory) as c:
        r = c.get("/health")
        assert r.status_code == 503 and "manifest.json is missing" in r.json()["message"]
        assert_error(chat(c, [{"role": "user", "content": "x"}]), 503, "model_load_failed", text="manifest.json")


def test_serve_stops_and_raises_when_the_model_fails_to_load():
    def broken_factory():
        raise BundleError("manifest.json is missing")

    with pytest.raises(MiniCPMOError, match="manifest.json is missing"):
        serve(broken_factory, ServerSettings(port=0))


def test_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        ServerSettings(allowed_local_media=tmp_path / "missing")
    with pytest.raises(ValueError, match="max_queue"):
        ServerSettings(max_queue=0)
    with pytest.raises(ValueError, match="default_lookup"):
        ServerSettings(default_lookup=17)
    assert ServerSettings(allowed_local_media=tmp_path / ".").allowed_local_media == tmp_path.resolve()
