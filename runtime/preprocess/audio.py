"""Audio clip -> 16 kHz mono float32 -> Whisper log-mel features, plus the prompt placeholder text.

Follows upstream processing_minicpmo.py (`audio_feature_extract`, `get_audio_placeholder`) and
transformers' WhisperFeatureExtractor (defaults: 80 mels, n_fft 400, hop 160, 30 s padding). Torch-free:
numpy here, soundfile + soxr (the `audio` extra) imported only when a clip is decoded.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import AudioError

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
PIECE_SAMPLES = 30 * SAMPLE_RATE  # upstream cuts longer clips into 30 s pieces
PIECE_FRAMES = PIECE_SAMPLES // HOP_LENGTH  # 3000 feature frames per full piece
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
DEFAULT_MAX_SECONDS = 600.0
_RATE_RANGE = (1_000, 384_000)
_BLOCK_FRAMES = 1 << 16
_ACCEPTED = {"WAV", "WAVEX", "FLAC", "OGG", "MP3", "AIFF", "AU", "CAF", "W64", "RF64"}
_CONTAINERS = {  # accepted format hints (file suffixes, MIME subtypes, OpenAI input_audio formats)
    "wav": "WAV", "wave": "WAV", "x-wav": "WAV", "vnd.wave": "WAV", "flac": "FLAC", "x-flac": "FLAC",
    "ogg": "OGG", "oga": "OGG", "opus": "OGG", "vorbis": "OGG", "mp3": "MP3", "mpeg": "MP3",
    "aiff": "AIFF", "aif": "AIFF", "au": "AU", "caf": "CAF", "w64": "W64", "rf64": "RF64",
}


# -- decoding ---------------------------------------------------------------------------------------
def _soundfile():
    try:
        import soundfile
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libsndfile is not
        raise AudioError(f"audio input needs soundfile and soxr (pip install 'minicpmo-onnx[audio]'): {e}",
                         code="audio_unavailable") from None
    return soundfile


def _soxr():
    try:
        import soxr
    except ImportError as e:
        raise AudioError(f"audio input needs soundfile and soxr (pip install 'minicpmo-onnx[audio]'): {e}",
                         code="audio_unavailable") from None
    return soxr


def _container(fmt: str | None, source: str) -> str | None:
    if fmt is None:
        return None
    key = fmt.strip().lower().removeprefix("audio/").lstrip(".")
    if key not in _CONTAINERS:
        raise AudioError(f"{source}: unsupported audio format {fmt!r} (supported: wav, flac, ogg, mp3, "
                         "aiff, au, caf, w64, rf64)", code="unsupported_audio_format")
    return _CONTAINERS[key]


def decode_audio_bytes(data: bytes, fmt: str | None = None, *, max_seconds: float = DEFAULT_MAX_SECONDS,
                       source: str = "audio") -> np.ndarray:
    """Decode an encoded clip (WAV/FLAC/OGG/MP3/AIFF/AU/CAF/W64/RF64) to float32 mono 16 kHz samples [n].

    The container is detected from the data; `fmt` (e.g. "wav", "mp3", "audio/flac") is only checked
    to be a supported name. Channels are averaged and other rates resampled with soxr (HQ), as
    librosa.load(sr=16000) does upstream. The duration is checked from the header before the samples
    are decoded, and again while decoding (stream headers can lie).

    Raises:
        AudioError: empty, damaged or non-audio data, an unsupported format, no samples, a clip longer
            than `max_seconds`, or non-finite samples.
    """
    if not data:
        raise AudioError(f"{source}: the audio data is empty")
    _container(fmt, source)
    return _decode(io.BytesIO(data), max_seconds, source)


def load_audio(src: str | Path, *, max_seconds: float = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """Decode an audio file by path (see decode_audio_bytes); only the header is read before the check."""
    path = Path(src)
    if not path.is_file():
        raise AudioError(f"{src}: no such audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{src}: the audio file is empty")
    return _decode(str(path), max_seconds, str(src))


def _decode(file, max_seconds: float, source: str) -> np.ndarray:
    sf = _soundfile()
    try:
        with sf.SoundFile(file) as f:
            _check_header(f.format, f.samplerate, f.channels, f.frames, max_seconds, source)
            mono, rate = _read_mono(f, max_seconds, source), f.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as e:
        raise AudioError(f"{source}: not a readable audio file ({_reason(e)})") from None
    if mono.size == 0:
        raise AudioError(f"{source}: the audio contains no samples")
    if not np.isfinite(mono).all():
        raise AudioError(f"{source}: the audio contains NaN or infinite samples")
    if rate != SAMPLE_RATE:
        mono = _soxr().resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _reason(e: Exception) -> str:
    text = str(e)
    # soundfile prefixes "Error opening <_io.BytesIO object at 0x...>: "; keep libsndfile's own words
    return text.split(": ", 1)[1] if text.startswith("Error opening") and ": " in text else text


def _check_header(container: str, rate: int, channels: int, frames: int, max_seconds: float,
                  source: str) -> None:
    if container not in _ACCEPTED:  # libsndfile also reads MAT5, HTK, SD2, ...: not audio clips people send
        raise AudioError(f"{source}: unsupported audio container {container}", code="unsupported_audio_format")
    if not _RATE_RANGE[0] <= rate <= _RATE_RANGE[1]:
        raise AudioError(f"{source}: unsupported sample rate {rate} Hz", code="unsupported_audio_format")
    if channels < 1:
        raise AudioError(f"{source}: the audio has no channels")
    if frames > max_seconds * rate:
        raise AudioError(f"{source}: the audio is {frames / rate:.1f} s long; the limit is {max_seconds:g} s",
                         code="audio_too_long")


def _read_mono(f, max_seconds: float, source: str) -> np.ndarray:
    """Read block by block (downmixing each), refusing as soon as the limit is passed: the header's
    frame count can be unknown or wrong for streams."""
    limit = int(max_seconds * f.samplerate)
    blocks, total = [], 0
    while True:
        block = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)  # [n, channels]
        if len(block) == 0:
            break
        total += len(block)
        if total > limit:
            raise AudioError(f"{source}: the audio is longer than the limit of {max_seconds:g} s",
                             code="audio_too_long")
        blocks.append(block[:, 0].copy() if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


# -- features ---------------------------------------------------------------------------------------
def split_pieces(samples: np.ndarray) -> list[np.ndarray]:
    """Upstream cuts clips longer than 30 s into consecutive 30 s pieces (the last one shorter)."""
    n = len(samples)
    return [samples[i:i + PIECE_SAMPLES] for i in range(0, max(n, 1), PIECE_SAMPLES)]


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = N_MELS) -> np.ndarray:
    """Slaney-scale, slaney-normalised triangular filters over 0..8000 Hz: [n_mels, 1 + N_FFT//2] float64
    (transformers.audio_utils.mel_filter_bank as WhisperFeatureExtractor calls it)."""
    def to_mel(hz):
        hz = np.asarray(hz, dtype=np.float64)
        return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * 27.0 / np.log(6.4),
                        3.0 * hz / 200.0)

    def to_hz(mel):
        return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), 200.0 * mel / 3.0)

    edges = to_hz(np.linspace(to_mel(0.0), to_mel(8000.0), n_mels + 2))  # [n_mels + 2] Hz
    fft_hz = np.linspace(0, SAMPLE_RATE // 2, 1 + N_FFT // 2)
    slopes = edges[None, :] - fft_hz[:, None]  # [bins, n_mels + 2]
    width = np.diff(edges)
    down = -slopes[:, :-2] / width[:-1]
    up = slopes[:, 2:] / width[1:]
    bank = np.maximum(0.0, np.minimum(down, up))  # [bins, n_mels]
    bank *= 2.0 / (edges[2:] - edges[:-2])
    return np.ascontiguousarray(bank.T)


@lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    k = np.arange(N_FFT, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * k / N_FFT)  # periodic, like torch.hann_window


def feature_frames(n_samples: int) -> int:
    """Feature frames kept for a clip (upstream: attention_mask[::160].sum() = ceil(n / 160))."""
    return math.ceil(n_samples / HOP_LENGTH)


def log_mel_features(samples: np.ndarray) -> np.ndarray:
    """Whisper log-mel features of one piece (<= 30 s): [80, ceil(n/160)] float32.

    As upstream: the piece is zero-padded to 30 s, the STFT (periodic Hann, center=True reflect
    padding) power spectrum goes through the mel bank, the last frame is dropped, log10(max(x, 1e-10))
    is floored at (its max over the PADDED 30 s) - 8 and mapped to (x + 4) / 4; then the frames are
    cut back to the clip's length.
    """
    n = len(samples)
    if not 0 < n <= PIECE_SAMPLES:
        raise ValueError(f"a feature piece holds 1..{PIECE_SAMPLES} samples, got {n} (use split_pieces)")
    wave = np.zeros(PIECE_SAMPLES, np.float64)
    wave[:n] = np.asarray(samples, dtype=np.float32)  # upstream casts to float32 first
    wave = np.pad(wave, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(wave, N_FFT)[::HOP_LENGTH][:-1]  # [3000, 400]
    spec = np.fft.rfft(frames * _hann(), axis=-1)  # [3000, 201]
    power = spec.real ** 2 + spec.imag ** 2
    logmel = np.log10(np.maximum(power @ mel_filters().T, 1e-10))  # [3000, 80]
    logmel = np.maximum(logmel, logmel.max() - 8.0)
    logmel = (logmel + 4.0) / 4.0
    return np.ascontiguousarray(logmel[:feature_frames(n)].T, dtype=np.float32)


# -- token counts and placeholder text ---------------------------------------------------------------
def encoder_frames(n_feature_frames: int) -> int:
    """Frames after the stride-2 conv: (F - 1) // 2 + 1."""
    return (n_feature_frames - 1) // 2 + 1


def pooled_tokens(n_encoder_frames: int, pool_step: int = 2) -> int:
    """Tokens after AvgPool1d(pool_step, pool_step): (C - pool_step) // pool_step + 1 (0 when C < 2)."""
    return max((n_encoder_frames - pool_step) // pool_step + 1, 0)


def audio_token_count(n_samples: int, *, pool_step: int = 2) -> int:
    """Embedding tokens of a clip of n 16 kHz samples (upstream get_audio_placeholder's output_lens).

    Summing piece_token_count over the 30 s pieces gives the same number.
    """
    return pooled_tokens(encoder_frames(feature_frames(n_samples)), pool_step)


def piece_token_count(n_feature_frames: int, *, pool_step: int = 2) -> int:
    """Tokens the encoder keeps for one piece of F feature frames (upstream _get_feat_extract_output_lengths)."""
    return pooled_tokens(encoder_frames(n_feature_frames), pool_step)


def audio_placeholder(n_samples: int, chunk_input: bool = True, *, audio_start: str, unk: str, audio_end: str,
                      pool_step: int = 2, chunk_length_s: float = 1.0) -> str:
    """Upstream's placeholder text for a clip of n 16 kHz samples.

    chunk_input: one `audio_start + unk*k + audio_end` group per chunk_length_s chunk (k = 25 for 1 s,
    fewer in the last group), concatenated without separators; otherwise a single group of all tokens.
    A clip under 321 samples has no token at all and gets an empty string, as upstream.
    """
    total = audio_token_count(n_samples, pool_step=pool_step)
    if not chunk_input:
        return audio_start + unk * total + audio_end
    per_chunk = piece_token_count(int(chunk_length_s * FRAMES_PER_SECOND), pool_step=pool_step)
    if per_chunk <= 0:
        raise ValueError(f"chunk_length_s {chunk_length_s} is too short to hold one audio token")
    sizes = [min(per_chunk, total - start) for start in range(0, total, per_chunk)]
    return "".join(audio_start + unk * k + audio_end for k in sizes)


def merge_message_clips(clips: Sequence[np.ndarray], message_index: Sequence[int]) -> list[np.ndarray]:
    """Upstream chat() passes `audio_parts` (the message index of every clip): consecutive clips of the
    same message are concatenated into ONE waveform before feature extraction and encoding (while each
    clip keeps its own placeholder). Returns the waveforms the encoder sees, in order."""
    if len(clips) != len(message_index):
        raise ValueError("one message index per clip is needed")
    merged: list[list[np.ndarray]] = []
    for i, clip in enumerate(clips):
        if i and message_index[i] == message_index[i - 1]:
            merged[-1].append(clip)
        else:
            merged.append([clip])
    return [group[0] if len(group) == 1 else np.concatenate(group) for group in merged]
