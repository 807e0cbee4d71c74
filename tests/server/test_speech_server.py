"""Audio output through the OpenAI API: the stock `openai` client asks for modalities text+audio on a
real tiny bundle (its speech model a stand-in, tests/speech_fakes.py) and gets audio that soundfile
reads at 24 kHz, streamed and not; and the 400s (unknown voice, format, bad reference clip, audio
settings without the modality, a model that cannot speak)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from speech_fakes import FakeSpeechModel

from minicpmo.runtime.pipeline import Pipeline
from minicpmo.runtime.voices import Voices
from server_helpers import FakePipeline, running_server, started_client

openai = pytest.importorskip("openai")
sf = pytest.importorskip("soundfile")
QUESTION = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def speaking(fp32_bundle, tmp_path_factory):
    pipe = Pipeline.load(fp32_bundle, provider="cpu", context_length=512)
    pipe.tts = FakeSpeechModel(llm_dim=pipe.manifest["decoder"]["hidden_size"], end_after=70)
    folder = tmp_path_factory.mktemp("voices")
    sf.write(folder / "anna.wav", (0.2 * np.sin(np.arange(32000) / 9)).astype(np.float32), 16000)
    pipe.voices = Voices(folder, {"anna": "anna.wav"})
    with running_server(pipe) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60), pipe


def _ask(oai, fmt="wav", voice="default", **kw):
    return oai.chat.completions.create(model=oai.models.list().data[0].id, messages=QUESTION, max_tokens=10,
                                       temperature=0, seed=4, modalities=["text", "audio"],
                                       audio={"voice": voice, "format": fmt}, **kw)


def test_openai_client_gets_a_wav_streamed_and_not(speaking):
    oai, _ = speaking
    reply = _ask(oai)
    message = reply.choices[0].message
    assert message.content is None and message.audio.id and message.audio.expires_at > 0
    samples, rate = sf.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="float32")
    assert rate == 24000 and len(samples) > 24000 * 0.5
    transcript, pieces, ids = [], [], set()
    for chunk in _ask(oai, stream=True):
        audio = chunk.choices[0].delta.audio if chunk.choices else None  # the client's ChoiceDeltaAudio
        if audio:
            transcript.append(audio.transcript or "")
            if audio.data:
                pieces.append(base64.b64decode(audio.data))
            ids.add(audio.id)
    assert "".join(transcript) == message.audio.transcript
    assert len(pieces) > 1  # sent in chunks, not at the end
    assert ids - {None} == {next(i for i in ids if i)}  # one id, on the first audio piece
    streamed, rate = sf.read(io.BytesIO(b"".join(pieces)), dtype="float32")
    assert rate == 24000
    np.testing.assert_array_equal(streamed, samples)  # greedy text and a seeded voice: the same audio


def test_pcm16_is_the_same_samples_without_a_header(speaking):
    oai, _ = speaking
    wav = base64.b64decode(_ask(oai).choices[0].message.audio.data)
    raw = base64.b64decode(_ask(oai, fmt="pcm16").choices[0].message.audio.data)
    assert wav[44:] == raw and wav[:4] == b"RIFF"


def test_a_bundle_voice_and_a_request_reference_clip(speaking):
    oai, pipe = speaking
    assert _ask(oai, voice="anna").choices[0].message.audio.data
    assert "Clone the voice" in pipe.tokenizer.decode(pipe.last_prompt_ids)
    clip = io.BytesIO()
    sf.write(clip, (0.2 * np.sin(np.arange(24000) / 5)).astype(np.float32), 16000, format="WAV")
    reference = {"data": base64.b64encode(clip.getvalue()).decode(), "format": "wav"}
    reply = oai.chat.completions.create(model="tiny-fp32", messages=QUESTION, max_tokens=6, temperature=0,
                                        modalities=["text", "audio"],
                                        audio={"voice": "default", "format": "wav"},
                                        extra_body={"audio": {"format": "wav", "reference_audio": reference}})
    assert reply.choices[0].message.audio.data


@pytest.mark.parametrize("audio, modalities, code, words", [
    ({"voice": "nobody", "format": "wav"}, ["text", "audio"], "unknown_voice", "anna, default"),
    ({"voice": "default", "format": "mp3"}, ["text", "audio"], "invalid_value", "wav, pcm16"),
    (None, ["text", "audio"], "missing_field", "format"),
    ({"voice": "default", "format": "wav"}, ["text"], "invalid_value", "modalities"),
    ({"voice": "default", "format": "wav", "speed": 2}, ["text", "audio"], "unknown_field", "audio.speed"),
    ({"format": "wav", "reference_audio": {"data": base64.b64encode(b"junk" * 50).decode()}}, ["text", "audio"],
     "invalid_audio", "not a readable audio file"),
    ({"format": "wav", "reference_audio": {"data": ""}}, ["text", "audio"], "invalid_audio", "empty"),
])
def test_bad_audio_requests_are_400s(speaking, audio, modalities, code, words):
    oai, _ = speaking
    body = {"modalities": modalities} | ({"audio": audio} if audio is not None else {})
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny-fp32", messages=QUESTION, max_tokens=4, extra_body=body)
    err = e.value.body
    assert err["code"] == code and words in err["message"], err


def test_audio_from_a_model_without_speech_is_a_400():
    with started_client(FakePipeline()) as client:
        r = client.post("/v1/chat/completions", json={
            "model": "fake-model", "messages": QUESTION, "modalities": ["text", "audio"],
            "audio": {"voice": "default", "format": "wav"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_audio_output"


def test_the_real_speech_graphs_through_the_openai_client(fp32_bundle):
    """The tiny bundle's own speech graphs (not a stand-in): streamed and not, the same WAV."""
    pipe = Pipeline.load(fp32_bundle, provider="cpu", context_length=512)
    assert pipe.tts is not None
    pipe.speech_info = {**pipe.speech_info, "max_new_codes": 120}  # random weights seldom end: keep it short
    with running_server(pipe) as (url, _):
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        audio = _ask(oai).choices[0].message.audio
        whole, rate = sf.read(io.BytesIO(base64.b64decode(audio.data)), dtype="float32")
        pieces = [base64.b64decode(c.choices[0].delta.audio.data) for c in _ask(oai, stream=True)
                  if c.choices and c.choices[0].delta.audio and c.choices[0].delta.audio.data]
    streamed, rate2 = sf.read(io.BytesIO(b"".join(pieces)), dtype="float32")
    assert rate == rate2 == 24000 and len(whole) <= 120 * 512 and len(whole) > 0
    np.testing.assert_array_equal(streamed, whole)
