"""The real `openai` client against a real uvicorn server (127.0.0.1, random port) on a FakePipeline."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from server_helpers import (
    FakePipeline,
    b64,
    data_uri,
    image_part,
    make_image,
    reply_for,
    running_server,
)

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory):
    from server_helpers import png_bytes

    folder = tmp_path_factory.mktemp("media")
    (folder / "cat.png").write_bytes(png_bytes(make_image(7)))
    (folder.parent / "private.png").write_bytes(png_bytes(make_image(8)))
    return folder


@pytest.fixture(scope="module")
def server(media_folder):
    fake = FakePipeline()
    with running_server(fake, allow_private_urls=True, allowed_local_media=media_folder) as (url, state):
        yield url, fake


@pytest.fixture(scope="module")
def oai(server):
    url, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)


def ask(oai, messages, **kw):
    return oai.chat.completions.create(model="fake-model", messages=messages, **kw)


def stream_text(oai, messages, **kw) -> tuple[str, list]:
    chunks = list(ask(oai, messages, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def decoded_user(*parts) -> dict:
    content = [{"type": "image", "image": p} if not isinstance(p, str) else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}


def test_text_non_streaming_and_streaming(oai):
    messages = [{"role": "system", "content": "short answers"}, {"role": "user", "content": "hello"}]
    r = ask(oai, messages, max_tokens=6, temperature=0, seed=1)
    assert r.id.startswith("chatcmpl-") and r.model == "fake-model"
    assert r.choices[0].message.content == reply_for(messages, 6)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.total_tokens == r.usage.prompt_tokens + 6
    text, chunks = stream_text(oai, messages, max_completion_tokens=6, stream_options={"include_usage": True})
    assert text == reply_for(messages, 6)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_models_list(oai):
    assert [m.id for m in oai.models.list()] == ["fake-model"]


def test_images_by_url_data_uri_base64_and_local_path(oai, img_url):
    cases = [
        (f"{img_url}/img/3.png", make_image(3)),
        (f"{img_url}/redirect/2/4.png", make_image(4)),
        (data_uri(make_image(5)), make_image(5)),
        (b64(make_image(6)), make_image(6)),
        ("cat.png", make_image(7)),
    ]
    for url, img in cases:
        r = ask(oai, [{"role": "user", "content": [image_part(url), {"type": "text", "text": "what?"}]}])
        assert r.choices[0].message.content == reply_for([decoded_user(img, "what?")]), url


def test_local_path_outside_the_folder_is_refused(oai, media_folder):
    for url in ("../private.png", str(media_folder.parent / "private.png"),
                f"file://{media_folder.parent / 'private.png'}"):
        with pytest.raises(openai.BadRequestError) as e:
            ask(oai, [{"role": "user", "content": [image_part(url)]}])
        assert e.value.status_code == 400 and "allowed media folder" in e.value.message, url


def test_two_images_and_several_turns_streamed(oai, img_url):
    a, b, c = make_image(1), make_image(2), make_image(3)
    messages = [
        {"role": "system", "content": "you see images"},
        {"role": "user", "content": [image_part(data_uri(a)), image_part(f"{img_url}/img/2.png"),
                                     {"type": "text", "text": "compare"}]},
        {"role": "assistant", "content": "they differ"},
        {"role": "user", "content": [image_part(b64(c)), {"type": "text", "text": "and now?"}]},
    ]
    decoded = [messages[0], decoded_user(a, b, "compare"), messages[2], decoded_user(c, "and now?")]
    text, _ = stream_text(oai, messages)
    assert text == reply_for(decoded)


def test_eight_concurrent_streams_get_their_own_output(oai):
    def one(i: int) -> tuple[str, str]:
        messages = [{"role": "user", "content": f"client {i}"}]
        text, _ = stream_text(oai, messages, max_tokens=12)
        return text, reply_for(messages, 12)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(got == want for got, want in results)
    assert len({got for got, _ in results}) == 8


def test_errors_through_the_client(oai, img_url):
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        ask(oai, [{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|context"):
        ask(oai, [{"role": "user", "content": "LONG " * 300}])
    with pytest.raises(openai.BadRequestError, match="redirects"):
        ask(oai, [{"role": "user", "content": [image_part(f"{img_url}/redirect/5/1.png")]}])


def test_private_urls_refused_without_the_flag(img_url):
    with running_server(FakePipeline()) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
        for image in (f"{img_url}/img/1.png", "http://localhost:9/x.png", "http://[::1]:9/x.png"):
            with pytest.raises(openai.BadRequestError, match="--allow-private-urls"):
                ask(client, [{"role": "user", "content": [image_part(image)]}])


def test_api_key_through_the_client():
    with running_server(FakePipeline(), api_key="sekret") as (url, _):
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0, timeout=20)
        with pytest.raises(openai.AuthenticationError):
            ask(bad, [{"role": "user", "content": "x"}])
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0, timeout=20)
        assert ask(good, [{"role": "user", "content": "x"}]).choices[0].message.content
