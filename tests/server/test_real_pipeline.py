"""The server on a real tiny bundle: the official openai client gets the same text as `minicpmo infer`
for the same prompt and seed, images and audio included."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import soundfile as sf

from minicpmo.runtime.pipeline import Pipeline
from server_helpers import running_server
from synthetic_media import tone

DEMO_IMAGE = Path(__file__).resolve().parents[2] / "cli" / "assets" / "demo.png"


def _infer(bundle, *args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "minicpmo.cli.main", "infer", "--model", str(bundle), *args,
                           "--json"], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def server(int4_bundle):
    with running_server(Pipeline.load(int4_bundle, provider="cpu")) as (url, _state):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_same_text_as_infer(server, int4_bundle):
    data_uri = "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()
    expected = _infer(int4_bundle, "--image", str(DEMO_IMAGE), "--prompt", "What is here?", "--max-tokens", "10",
                      "--temperature", "0.8", "--seed", "11")
    model = server.models.list().data[0].id
    reply = server.chat.completions.create(
        model=model, max_tokens=10, temperature=0.8, seed=11,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri}},
                                               {"type": "text", "text": "What is here?"}]}])
    assert reply.choices[0].message.content == expected["text"]
    assert reply.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    stream = server.chat.completions.create(
        model=model, max_tokens=10, temperature=0.8, seed=11, stream=True,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri}},
                                               {"type": "text", "text": "What is here?"}]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected["text"]


def test_input_audio(server, int4_bundle, tmp_path):
    wav = tmp_path / "clip.wav"
    sf.write(wav, tone(1.5), 16000)
    expected = _infer(int4_bundle, "--audio", str(wav), "--prompt", "Transcribe.", "--max-tokens", "6")
    buf = io.BytesIO()
    sf.write(buf, tone(1.5), 16000, format="WAV")
    reply = server.chat.completions.create(
        model=server.models.list().data[0].id, max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(),
                                                    "format": "wav"}},
            {"type": "text", "text": "Transcribe."}]}])
    assert reply.choices[0].message.content == expected["text"]


def test_context_overflow_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.chat.completions.create(model=server.models.list().data[0].id, max_tokens=4,
                                       messages=[{"role": "user", "content": "word " * 5000}])
    assert e.value.body["code"] == "context_length_exceeded"


def test_video_frames_extension(server, int4_bundle, tmp_path):
    """The documented extension part: frames as image URLs, fed like `infer --frames DIR`."""
    from synthetic_media import make_image

    frames = [make_image(320, 240, seed=k) for k in range(3)]
    folder = tmp_path / "frames"
    folder.mkdir()
    uris = []
    for k, frame in enumerate(frames):
        frame.save(folder / f"{k:03d}.png")
        uris.append("data:image/png;base64," + base64.b64encode((folder / f"{k:03d}.png").read_bytes()).decode())
    expected = _infer(int4_bundle, "--frames", str(folder), "--prompt", "What happens?", "--max-tokens", "6")
    reply = server.chat.completions.create(
        model=server.models.list().data[0].id, max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": [{"type": "video_frames", "video_frames": {"frames": uris}},
                                               {"type": "text", "text": "What happens?"}]}])
    assert reply.choices[0].message.content == expected["text"]
    assert reply.usage.prompt_tokens == expected["usage"]["prompt_tokens"]


def test_cache_prompt_false_prefills_the_whole_prompt(server):
    """A repeated prompt re-uses its KV prefix (usage.prompt_tokens_details.cached_tokens); the
    `cache_prompt: false` extension turns that off for one request, and such cold runs repeat exactly."""
    model = server.models.list().data[0].id
    messages = [{"role": "user", "content": "Name three colours."}]
    first = server.chat.completions.create(model=model, max_tokens=6, temperature=0, messages=messages)
    warm = server.chat.completions.create(model=model, max_tokens=6, temperature=0, messages=messages)
    assert warm.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1
    cold = [server.chat.completions.create(model=model, max_tokens=6, temperature=0, messages=messages,
                                           extra_body={"cache_prompt": False}) for _ in range(2)]
    assert [c.usage.prompt_tokens_details.cached_tokens for c in cold] == [0, 0]
    assert cold[0].choices[0].message.content == cold[1].choices[0].message.content


def test_lookup_drafts_are_reported_as_predicted_tokens(server, monkeypatch):
    """The `lookup` extension reaches the decode loop; kept and dropped draft tokens come back under
    OpenAI's usage.completion_tokens_details names."""
    from minicpmo.runtime import generate

    monkeypatch.setattr(generate, "lookup_draft", lambda history, n, ngrams=None: history[-n:])  # mostly wrong
    model = server.models.list().data[0].id
    messages = [{"role": "user", "content": "Name three colours."}]
    plain = server.chat.completions.create(model=model, max_tokens=12, temperature=0, messages=messages)
    details = plain.usage.completion_tokens_details
    assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (0, 0)
    drafted = server.chat.completions.create(model=model, max_tokens=12, temperature=0, messages=messages,
                                             extra_body={"lookup": 3})
    details = drafted.usage.completion_tokens_details
    assert details.rejected_prediction_tokens > 0 and drafted.usage.completion_tokens == 12
