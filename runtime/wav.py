"""Audio out: float samples -> 16-bit PCM, as a WAV file or raw little-endian pcm16 (stdlib only)."""

from __future__ import annotations

import struct

import numpy as np

UNKNOWN_LENGTH = None  # a streamed WAV's header: sizes 0xFFFFFFFF, as streaming encoders write them


def pcm16(samples: np.ndarray) -> bytes:
    """float samples in [-1, 1] (clipped) -> little-endian signed 16-bit mono bytes."""
    x = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
    return np.round(x * 32767.0).astype("<i2").tobytes()


def wav_header(n_samples: int | None, sample_rate: int) -> bytes:
    """The 44-byte header of a mono 16-bit PCM WAV; `n_samples` None for a stream of unknown length
    (libsndfile, ffmpeg and browsers read such a stream to its end)."""
    data = 0xFFFFFFFF if n_samples is None else 2 * n_samples
    riff = 0xFFFFFFFF if n_samples is None else 36 + data
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
    return b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", data)


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """A whole mono 16-bit PCM WAV file."""
    samples = np.asarray(samples).reshape(-1)
    return wav_header(len(samples), sample_rate) + pcm16(samples)


def write_wav(path, samples: np.ndarray, sample_rate: int) -> None:
    with open(path, "wb") as f:
        f.write(wav_bytes(samples, sample_rate))
