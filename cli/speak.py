"""--speak and --voice: a spoken reply written as a 24 kHz WAV file."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..runtime.speech import SAMPLE_RATE, SpeechRequest
from ..runtime.wav import write_wav


def speech_request(voice: str | None, seed: int | None) -> SpeechRequest:
    """--voice: a file is a reference clip (decoded now, so a bad one fails before the model loads);
    anything else names a voice the bundle carries (checked once it is loaded)."""
    if voice and (Path(voice).exists() or any(sep in voice for sep in "/\\.")):
        from ..runtime.voices import reference_clip

        return SpeechRequest(reference=reference_clip(voice), seed=seed)
    return SpeechRequest(voice=voice or "default", seed=seed)


def save_reply(path: Path, chunks: list, stats) -> str:
    """Write the audio chunks as one WAV file (through a temporary name: never half a file); returns
    the line that says where it went."""
    import numpy as np

    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    write_wav(tmp, samples, SAMPLE_RATE)
    os.replace(tmp, path)
    seconds = len(samples) / SAMPLE_RATE
    note = "" if stats is None or not stats.truncated_text else " (only the start of the reply: it is longer " \
        "than the speech text reserve)"
    rtf = f", {stats.seconds / seconds:.2f} s of compute per second" if stats is not None and seconds else ""
    return f"wrote {path} ({seconds:.1f} s of speech{rtf}){note}"


def check_output(path: Path) -> None:
    if path.is_dir():
        raise click.BadParameter(f"{path} is a folder; give a file name such as reply.wav", param_hint="--speak")
