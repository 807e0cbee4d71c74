"""OpenAI audio output: `modalities: ["text", "audio"]` with `audio: {"voice", "format"}`.

Not streamed, the reply is `choices[0].message.audio` = {id, data (base64), expires_at, transcript}
with `content` null, as OpenAI's audio models answer. Streamed, the text comes as
`delta.audio.transcript` pieces and the sound as `delta.audio.data` pieces (the first carrying `id`
and `expires_at`); the pieces' decoded bytes joined are one file of the asked format: raw pcm16, or a
WAV whose header (first piece) has the streaming sizes 0xFFFFFFFF. 24 kHz mono 16-bit either way.

Voices: the ones the bundle carries (GET /v1/models lists nothing of them; an unknown name is a 400
that lists them), `default` always. Extension: `audio.reference_audio: {"data": base64, "format"}`,
a reference clip of a few seconds whose voice the reply imitates (upstream's voice cloning prompt).
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..speech import SAMPLE_RATE, SpeechRequest
from ..wav import pcm16, wav_bytes, wav_header
from .api_errors import ApiError

FORMATS = ("wav", "pcm16")
AUDIO_FIELDS = {"voice", "format", "reference_audio"}
EXPIRES_S = 3600  # the id names nothing stored here; the field is OpenAI's shape


@dataclass
class AudioOutput:
    format: str
    speech: SpeechRequest
    id: str = field(default_factory=lambda: f"audio_{secrets.token_hex(12)}")
    expires_at: int = field(default_factory=lambda: int(time.time()) + EXPIRES_S)
    _started: bool = False

    def message_audio(self, transcript: str, chunks: list[np.ndarray]) -> dict[str, Any]:
        samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        data = wav_bytes(samples, SAMPLE_RATE) if self.format == "wav" else pcm16(samples)
        return {"id": self.id, "data": base64.b64encode(data).decode("ascii"), "expires_at": self.expires_at,
                "transcript": transcript}

    def delta_audio(self, samples: np.ndarray) -> dict[str, Any]:
        data = pcm16(samples)
        out: dict[str, Any] = {}
        if not self._started:
            self._started = True
            out = {"id": self.id, "expires_at": self.expires_at}
            if self.format == "wav":
                data = wav_header(None, SAMPLE_RATE) + data
        out["data"] = base64.b64encode(data).decode("ascii")
        return out


def _bad(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def audio_output(req, pipeline) -> AudioOutput | None:
    """The request's audio output settings, checked against the model (400s), or None for text only.
    A reference clip is decoded later (`decode_reference`), off the event loop."""
    modalities = set(req.modalities or ("text",))
    if modalities - {"text", "audio"}:
        return _fail_modalities(modalities)
    if "audio" not in modalities:
        if req.audio:
            raise _bad('"audio" settings need modalities ["text", "audio"]', "audio")
        return None
    if getattr(pipeline, "tts", None) is None:
        raise _bad("this model cannot speak: its bundle was exported without the speech (TTS) model",
                   "modalities", "unsupported_audio_output")
    audio = req.audio
    if not isinstance(audio, dict):
        raise _bad('audio output needs "audio": {"voice": ..., "format": "wav" or "pcm16"}', "audio", "missing_field")
    unknown = sorted(set(audio) - AUDIO_FIELDS)
    if unknown:
        raise _bad(f"unknown field 'audio.{unknown[0]}'", f"audio.{unknown[0]}", "unknown_field")
    fmt = audio.get("format", "wav")
    if fmt not in FORMATS:
        raise _bad(f"audio.format {fmt!r} is not supported; use one of: {', '.join(FORMATS)}", "audio.format")
    voice, reference = audio.get("voice", "default"), audio.get("reference_audio")
    if not isinstance(voice, str):
        raise _bad("audio.voice must be a voice name (string)", "audio.voice")
    if reference is None and voice not in pipeline.voices.names:
        raise _bad(f"unknown voice {voice!r}; this model has: {', '.join(pipeline.voices.names)}", "audio.voice",
                   "unknown_voice")
    if reference is not None and (not isinstance(reference, dict) or not isinstance(reference.get("data"), str)):
        raise _bad('audio.reference_audio must be {"data": base64 audio, "format": "wav"|...}',
                   "audio.reference_audio")
    return AudioOutput(fmt, SpeechRequest(voice=voice, seed=req.seed))


def _fail_modalities(modalities: set[str]):
    raise _bad(f"unsupported modalities {sorted(modalities - {'text', 'audio'})}; this server speaks "
               '"text" and "audio"', "modalities")


def decode_reference(req, out: AudioOutput | None) -> None:
    """Decode a request's reference clip into `out.speech` (AudioError -> the caller's 400)."""
    reference = (req.audio or {}).get("reference_audio") if out is not None else None
    if reference is None:
        return
    from ..errors import AudioError
    from ..voices import reference_clip

    try:
        data = base64.b64decode(reference["data"], validate=True)
    except ValueError as e:
        raise AudioError("audio.reference_audio.data is not valid base64",
                         param="audio.reference_audio.data") from e
    clip = reference_clip(data, reference.get("format"), source="audio.reference_audio")
    out.speech = SpeechRequest(reference=clip, seed=out.speech.seed)
