"""Voices: which voice a spoken reply takes. A voice is a reference clip the reply imitates; upstream
(`get_sys_prompt(ref_audio, mode, language)`) puts it in a first user message between two prompt
texts. The voice named `default` is the bundle's clip of that name if it carries one, else no clip
at all: the conversation is left as it is and the model speaks in its own voice, as upstream
`chat(generate_audio=True)` does without a system prompt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import AudioError, InputError
from .types import Message

DEFAULT_VOICE = "default"
REFERENCE_MAX_SECONDS = 60.0  # a voice sample is a few seconds; upstream's own examples are < 20 s
REFERENCE_MIN_SECONDS = 0.5
# upstream get_sys_prompt's texts: (before the clip, after the clip or None)
VOICE_PROMPTS = {
    ("audio_assistant", "en"): ("Clone the voice in the provided audio prompt.",
                                "As an assistant, you will speak using this voice style."),
    ("audio_assistant", "zh"): ("模仿输入音频中的声音特征。", "作为助手，你将使用这种声音风格说话。"),
    ("audio_roleplay", "en"): ("Clone the voice in the provided audio prompt.",
                               "Try to role-play the character based on the audio prompt above."),
    ("audio_roleplay", "zh"): ("模仿输入音频中的声音特征。", "假装你是上述音频中的人物，与我进行对话。"),
    ("voice_cloning", "en"): ("Clone the voice in the provided audio prompt.", None),
    ("voice_cloning", "zh"): ("模仿输入音频中的声音特征。", None),
}


def voice_message(clip: np.ndarray, mode: str = "audio_assistant", language: str = "en") -> Message:
    """Upstream's first message for a reference clip (16 kHz samples)."""
    if (mode, language) not in VOICE_PROMPTS:
        modes = sorted({m for m, _ in VOICE_PROMPTS})
        raise InputError(f"unknown voice mode {mode!r} or language {language!r} (modes: {', '.join(modes)}; "
                         "languages: en, zh)", param="audio.voice")
    before, after = VOICE_PROMPTS[(mode, language)]
    content = [{"type": "text", "text": before}, {"type": "audio", "audio": clip}]
    if after:
        content.append({"type": "text", "text": after})
    return {"role": "user", "content": content}


def reference_clip(data: bytes | str | Path, fmt: str | None = None, source: str = "reference clip") -> np.ndarray:
    """Decode a reference clip (file path or encoded bytes) to 16 kHz mono samples; AudioError for an
    empty, unreadable, too short or too long clip."""
    from .preprocess.audio import SAMPLE_RATE, decode_audio_bytes, load_audio

    if isinstance(data, str | Path):  # by path: the header's duration is checked before any sample is read
        clip = load_audio(data, max_seconds=REFERENCE_MAX_SECONDS)
        source = f"{source} {data}"
    else:
        clip = decode_audio_bytes(data, fmt, max_seconds=REFERENCE_MAX_SECONDS, source=source)
    if len(clip) < REFERENCE_MIN_SECONDS * SAMPLE_RATE:
        raise AudioError(f"{source} is {len(clip) / SAMPLE_RATE:.2f} s long; a voice needs at least "
                         f"{REFERENCE_MIN_SECONDS:g} s of speech", param="audio.voice")
    return clip


class Voices:
    """The voices a bundle carries: manifest speech.voices = {name: clip file}, plus `default`."""

    def __init__(self, folder: Path, files: dict[str, str]):
        self.folder, self.files = folder, dict(files)
        self._clips: dict[str, np.ndarray] = {}

    @property
    def names(self) -> list[str]:
        return sorted({DEFAULT_VOICE, *self.files})

    def clip(self, name: str) -> np.ndarray | None:
        """The voice's reference clip (None: the model's own voice); InputError for an unknown name."""
        if name not in self.names:
            raise InputError(f"unknown voice {name!r}; this model has: {', '.join(self.names)}",
                             param="audio.voice", code="unknown_voice")
        if name not in self.files:
            return None
        if name not in self._clips:
            self._clips[name] = reference_clip(self.folder / self.files[name], source=f"voice {name!r}")
        return self._clips[name]
