"""Audio decoding, Whisper log-mel features and placeholder text (runtime/preprocess/audio.py)."""

from __future__ import annotations

import io
import math
import struct
import sys
import time

import numpy as np
import pytest

from minicpmo.runtime.errors import AudioError
from minicpmo.runtime.preprocess import audio as A

try:  # decoding needs the `audio` extra; features and placeholders do not
    import soundfile as sf
    import soxr  # noqa: F401
except (ImportError, OSError):
    sf = None
needs_codecs = pytest.mark.skipif(sf is None, reason="soundfile/soxr (the audio extra) not installed")

SR = 16_000
TOKENS = {"audio_start": "<|audio_start|>", "unk": "<unk>", "audio_end": "<|audio_end|>"}


def tone(seconds: float, rate: int = SR, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(x: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def wav_header(frames: int, rate: int = SR, channels: int = 1, bits: int = 16) -> bytes:
    size = frames * channels * bits // 8
    fmt = struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    return b"RIFF" + struct.pack("<I", 36 + size) + b"WAVE" + b"fmt " + fmt + b"data" + struct.pack("<I", size)


# -- decoding ---------------------------------------------------------------------------------------
@needs_codecs
@pytest.mark.parametrize("subtype,tol", [("PCM_U8", 2e-2), ("PCM_16", 1e-4), ("PCM_24", 1e-6),
                                         ("PCM_32", 1e-6), ("FLOAT", 1e-7)])
def test_wav_sample_formats_at_16k(subtype, tol):
    x = tone(0.5)
    y = A.decode_audio_bytes(encode(x, SR, "WAV", subtype), "wav")
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=tol)


@needs_codecs
def test_stereo_44k_is_downmixed_and_resampled():
    left, right = tone(1.0, 44_100), 0.5 * tone(1.0, 44_100)
    y = A.decode_audio_bytes(encode(np.stack([left, right], axis=1), 44_100, "WAV", "PCM_24"))
    assert y.shape == (SR,) and y.dtype == np.float32
    expected = 0.75 * tone(1.0)
    inner = slice(400, SR - 400)  # away from the resampler's edge transients
    np.testing.assert_allclose(y[inner], expected[inner], atol=2e-3)


@needs_codecs
@pytest.mark.parametrize("fmt,subtype,rate", [("FLAC", "PCM_16", SR), ("OGG", "VORBIS", 22_050),
                                              ("MP3", "MPEG_LAYER_III", 44_100)])
def test_compressed_formats(fmt, subtype, rate):
    if fmt not in sf.available_formats():
        pytest.skip(f"libsndfile without {fmt}")
    y = A.decode_audio_bytes(encode(tone(1.0, rate), rate, fmt, subtype), fmt.lower())
    assert abs(len(y) - SR) <= 1200  # MP3 adds encoder delay/padding
    assert 0.3 < np.abs(y).max() < 0.7


@needs_codecs
def test_load_audio_from_path(tmp_path):
    path = tmp_path / "clip.flac"
    sf.write(path, tone(0.25), SR)
    np.testing.assert_allclose(A.load_audio(path), tone(0.25), atol=1e-4)
    with pytest.raises(AudioError, match="no such audio file"):
        A.load_audio(tmp_path / "missing.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        A.load_audio(tmp_path / "empty.wav")


@needs_codecs
@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (wav_header(1000)[:30], "not a readable audio file"),
    (np.random.default_rng(0).bytes(4096), "not a readable audio file"),
    (b"<html><body>not audio</body></html>", "not a readable audio file"),
    (wav_header(0), "no samples|not a readable"),
])
def test_bad_data(data, match):
    with pytest.raises(AudioError, match=match) as e:
        A.decode_audio_bytes(data)
    assert e.value.code in ("invalid_audio", "unsupported_audio_format")


@needs_codecs
def test_non_finite_samples():
    x = tone(0.1)
    x[100] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        A.decode_audio_bytes(encode(x, SR, "WAV", "FLOAT"))


@needs_codecs
def test_unsupported_format_hint():
    with pytest.raises(AudioError, match="unsupported audio format") as e:
        A.decode_audio_bytes(encode(tone(0.1), SR), "xyz")
    assert e.value.code == "unsupported_audio_format"
    A.decode_audio_bytes(encode(tone(0.1), SR), "audio/wav")  # MIME-style hints are fine


@needs_codecs
def test_too_long_bytes_refused_from_header():
    data = encode(tone(3.0, 8000), 8000, "WAV", "PCM_U8")
    with pytest.raises(AudioError, match="3.0 s long; the limit is 2 s") as e:
        A.decode_audio_bytes(data, max_seconds=2)
    assert e.value.code == "audio_too_long"


@needs_codecs
def test_hours_long_file_refused_quickly(tmp_path):
    """A real 3-hour WAV (sparse on disk): refused from its header, without reading the samples."""
    frames = SR * 3600 * 3
    path = tmp_path / "long.wav"
    with open(path, "wb") as f:
        f.write(wav_header(frames))
        f.truncate(44 + frames * 2)
    start = time.perf_counter()
    with pytest.raises(AudioError, match="10800.0 s long") as e:
        A.load_audio(path)
    assert time.perf_counter() - start < 1.0
    assert e.value.code == "audio_too_long"


@needs_codecs
def test_wav_header_claiming_more_than_present_decodes_what_is_there():
    data = wav_header(SR * 3600 * 2) + (tone(0.1) * 32767).astype("<i2").tobytes()
    assert len(A.decode_audio_bytes(data)) == int(0.1 * SR)


def test_missing_soundfile_is_an_audio_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)
    with pytest.raises(AudioError, match=r"minicpmo-onnx\[audio\]") as e:
        A.decode_audio_bytes(wav_header(10) + bytes(20))
    assert e.value.code == "audio_unavailable"


# -- features ---------------------------------------------------------------------------------------
def _signal(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    return (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 5_000, SR, 40_000, 480_000, 496_000])
def test_log_mel_matches_torch_reference(n):
    torch = pytest.importorskip("torch")
    from minicpmo.export.reference.audio import audio_pieces, whisper_log_mel

    x = _signal(n, seed=n)
    pieces, ref_pieces = A.split_pieces(x), audio_pieces(x)
    assert [len(p) for p in pieces] == [len(p) for p in ref_pieces]
    for piece in pieces:
        got = A.log_mel_features(piece)
        assert got.shape == (80, math.ceil(len(piece) / 160)) and got.dtype == np.float32
        np.testing.assert_allclose(got, whisper_log_mel(piece, torch.float64).numpy(), rtol=0, atol=1e-6)
        # upstream itself runs in float32
        np.testing.assert_allclose(got, whisper_log_mel(piece, torch.float32).numpy(), rtol=0, atol=5e-5)


def test_floor_uses_the_padded_frames():
    """A click at the very end: its loudest frame lies past ceil(n/160) and still sets the max - 8 floor."""
    torch = pytest.importorskip("torch")
    from minicpmo.export.reference.audio import whisper_log_mel

    x = np.full(16_000, 1e-4, np.float32)
    x[-40:] = 0.9
    got = A.log_mel_features(x)
    np.testing.assert_allclose(got, whisper_log_mel(x, torch.float64).numpy(), rtol=0, atol=1e-6)


def test_mel_filters_shape_and_slaney_area():
    bank = A.mel_filters()
    assert bank.shape == (80, 201)
    assert (bank >= 0).all() and (bank.max(axis=1) > 0).all()
    # slaney norm: every triangle has area 1 in Hz, i.e. sum * bin width(40 Hz) ~ 1
    np.testing.assert_allclose(bank.sum(axis=1) * 40.0, 1.0, rtol=0.15)


def test_split_pieces():
    x = np.arange(480_000 * 2 + 7, dtype=np.float32)
    pieces = A.split_pieces(x)
    assert [len(p) for p in pieces] == [480_000, 480_000, 7]
    np.testing.assert_array_equal(np.concatenate(pieces), x)
    assert [len(p) for p in A.split_pieces(x[:480_000])] == [480_000]


# -- placeholder text -------------------------------------------------------------------------------
def upstream_placeholder(audio_lens: int, chunk_input: bool, chunk_length: float = 1) -> str:
    """processing_minicpmo.MiniCPMOProcessor.get_audio_placeholder, spelled out."""
    pool_step = 2
    feature_lens = math.ceil(audio_lens / 160)
    feature_lens = (feature_lens - 1) // 2 + 1
    output_lens = (feature_lens - pool_step) // pool_step + 1
    if not chunk_input:
        return "<|audio_start|>" + "<unk>" * output_lens + "<|audio_end|>"
    in_chunk = ((int(chunk_length * 100) - 1) // 2 + 1 - pool_step) // pool_step + 1
    text, done = "", 0
    for _ in range((output_lens + in_chunk - 1) // in_chunk):
        k = min(in_chunk, output_lens - done)
        text += "<|audio_start|>" + "<unk>" * k + "<|audio_end|>"
        done += k
    return text


LENGTHS = [321, 480, 800, 8_000, 16_000, 16_001, 24_000, 36_800, 40_000, 123_457, 480_000, 496_000,
           480_000 * 2 + 5, 9_600_000]


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("chunk_input", [True, False])
def test_placeholder_matches_upstream(n, chunk_input):
    assert A.audio_placeholder(n, chunk_input, **TOKENS) == upstream_placeholder(n, chunk_input)


@pytest.mark.parametrize("n", LENGTHS)
def test_token_count_equals_sum_over_pieces(n):
    pieces = [min(A.PIECE_SAMPLES, n - s) for s in range(0, n, A.PIECE_SAMPLES)]
    assert A.audio_token_count(n) == sum(A.piece_token_count(A.feature_frames(p)) for p in pieces)


def test_placeholder_examples():
    text = A.audio_placeholder(36_800, **TOKENS)  # 2.3 s: 230 frames -> 115 -> 57 tokens = 25 + 25 + 7
    groups = text.split("<|audio_end|>")[:-1]
    assert [g.count("<unk>") for g in groups] == [25, 25, 7]
    assert all(g.startswith("<|audio_start|>") for g in groups)
    assert A.audio_token_count(SR) == 25 and A.audio_token_count(480_000) == 750
    assert A.audio_token_count(496_000) == 775
    assert A.audio_placeholder(320, **TOKENS) == ""  # too short for a single token, as upstream
    assert A.audio_placeholder(320, False, **TOKENS) == "<|audio_start|><|audio_end|>"


def test_merge_message_clips():
    a, b, c = np.ones(3, np.float32), 2 * np.ones(2, np.float32), 3 * np.ones(4, np.float32)
    merged = A.merge_message_clips([a, b, c], [1, 1, 3])
    assert [m.tolist() for m in merged] == [[1, 1, 1, 2, 2], [3, 3, 3, 3]]
    assert len(A.merge_message_clips([a, b, c], [1, 2, 1])) == 3


@needs_codecs
def test_exotic_containers_refused():
    data = encode(tone(0.1), SR, "MAT5", "PCM_16")
    with pytest.raises(AudioError, match="unsupported audio container MAT5") as e:
        A.decode_audio_bytes(data)
    assert e.value.code == "unsupported_audio_format"
