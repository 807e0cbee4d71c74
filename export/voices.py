"""The voices a bundle carries: reference clips the runtime can put in front of a conversation
(runtime/voices.py). They come from the checkpoint's upstream example voices
(`assets/input_examples/assistant_*_voice.wav`: female, male, default_female; the last is also
`default`) and from `--voice NAME=FILE` (ExportOptions.voices), each checked as the runtime checks a
reference clip and copied as `voice-NAME.<ext>`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

UPSTREAM_VOICES = "assets/input_examples"
UPSTREAM_DEFAULT = "default_female"  # upstream's assistant_default_female_voice.wav
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class VoiceError(ValueError):
    pass


def checkpoint_voices(checkpoint: Path) -> dict[str, Path]:
    found = {}
    for path in sorted((checkpoint / UPSTREAM_VOICES).glob("assistant_*_voice.wav")):
        found[path.stem.removeprefix("assistant_").removesuffix("_voice")] = path
    if UPSTREAM_DEFAULT in found:
        found.setdefault("default", found[UPSTREAM_DEFAULT])
    return found


def write_voices(checkpoint: Path, folder: Path, extra: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Copy the voices into the bundle folder; returns the manifest's speech.voices {name: file}."""
    from ..runtime.errors import AudioError
    from ..runtime.voices import reference_clip

    voices = checkpoint_voices(checkpoint)
    for name, src in extra:
        if not NAME.fullmatch(name):
            raise VoiceError(f"voice name {name!r}: use letters, digits, '_' and '-' (at most 64)")
        voices[name] = Path(src)
    out = {}
    for name, src in sorted(voices.items()):
        try:
            reference_clip(src, source=f"voice {name!r}")
        except AudioError as e:
            raise VoiceError(str(e)) from None
        file = f"voice-{name}{src.suffix.lower() or '.wav'}"
        shutil.copyfile(src, folder / file)
        out[name] = file
    return out
