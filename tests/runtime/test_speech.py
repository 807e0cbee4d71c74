"""The speech loop (runtime/speech.py) on a stand-in model: upstream's sampling rules, the end code,
the chunking and streaming, the cross-fade, the text reserve; plus the WAV encoders and voices."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from speech_fakes import SAMPLES_PER_FRAME, FakeSpeechModel

from minicpmo.runtime.errors import AudioError, InputError
from minicpmo.runtime.speech import (
    SpeechParams,
    SpeechStats,
    overlap_add,
    repetition_penalty,
    sample_step,
    speak,
    top_k_filter,
    top_p_filter,
)
from minicpmo.runtime.voices import Voices, reference_clip, voice_message
from minicpmo.runtime.wav import pcm16, wav_bytes, wav_header

HIDDEN = np.linspace(-1, 1, 64).astype(np.float32)


def _all(model, text="Hello there.", **kw):
    stats = SpeechStats()
    chunks = list(speak(model, HIDDEN, text, SpeechParams(seed=kw.pop("seed", 0), **kw), stats, text_end_id=21133))
    return chunks, stats


def test_streamed_audio_equals_one_decode_of_all_codes():
    """Chunks decoded with 4 codes of context and cross-faded give what one decode of every code
    gives, when the decoder is local (the stand-in's is)."""
    model = FakeSpeechModel(end_after=137)
    chunks, stats = _all(model)
    codes = np.concatenate(_codes(FakeSpeechModel(end_after=137)))
    whole = FakeSpeechModel().mel_to_audio(FakeSpeechModel().codes_to_mel(codes))
    np.testing.assert_allclose(np.concatenate(chunks), whole, rtol=0, atol=1e-6)
    assert stats.codes == 137 and stats.finished
    assert model.decoded[0] == 25 and all(n == 29 for n in model.decoded[1:-1])  # 25 new + 4 context


def _codes(model):
    from minicpmo.runtime.speech import generate_codes

    return list(generate_codes(model, HIDDEN, "Hello there.", SpeechParams(seed=0), SpeechStats()))


def test_first_audio_comes_after_one_chunk_not_at_the_end():
    model = FakeSpeechModel(end_after=310)
    steps_at_chunk, sizes = [], []
    for wav in speak(model, HIDDEN, "Hi.", SpeechParams(seed=1)):
        steps_at_chunk.append(model.steps)
        sizes.append(len(wav))
    assert steps_at_chunk[0] == 25  # all of the first chunk but the 4 codes the next one fades into
    assert sizes[0] == 21 * 512 and sizes[1] == 25 * 512
    assert steps_at_chunk[0] < steps_at_chunk[-1]
    assert len(steps_at_chunk) == 14  # 310 codes: 12 chunks of 25, one of 10, then the held tail


def test_end_code_is_blocked_in_the_first_ten_steps_of_every_chunk():
    chunks, stats = _all(FakeSpeechModel(end_after=0))  # the end code always wins when allowed
    assert stats.codes == 10 and stats.finished
    chunks, stats = _all(FakeSpeechModel(end_after=30))
    assert stats.codes == 35  # step 31 falls in the 2nd chunk's first ten: the end comes at its 11th
    assert sum(len(c) for c in chunks) == 35 * 2 * SAMPLES_PER_FRAME


def test_max_codes_stops_a_reply_that_never_ends():
    _, stats = _all(FakeSpeechModel(end_after=None), max_codes=60)
    assert stats.codes == 60 and not stats.finished
    assert stats.audio_seconds == pytest.approx(60 * 512 / 24000)


def test_seeded_sampling_repeats_and_seeds_differ():
    a = np.concatenate(_all(FakeSpeechModel(end_after=80), seed=5)[0])
    b = np.concatenate(_all(FakeSpeechModel(end_after=80), seed=5)[0])
    c = np.concatenate(_all(FakeSpeechModel(end_after=80), seed=6)[0])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_speaker_embedding_and_text_reach_the_model():
    model = FakeSpeechModel(end_after=12)
    _all(model, text="abc")
    ids, spk, mask = model.prefills[0]
    np.testing.assert_allclose(spk, model.speaker_embedding(HIDDEN))
    assert list(ids[2:5]) == [100 + ord(c) % 500 for c in "abc"] and mask.sum() == 1 + 1 + 3 + 1 + 1


def test_a_reply_longer_than_the_reserve_is_cut_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="minicpmo.runtime.speech"):
        _, stats = _all(FakeSpeechModel(end_after=12), text="x" * 400)
    assert stats.truncated_text
    assert "longer than the speech text reserve" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minicpmo.runtime.speech"):
        _, stats = _all(FakeSpeechModel(end_after=12), text="x" * 299)
    assert not stats.truncated_text and not caplog.text


# -- the sampling rules against torch versions of upstream's processors --------------------------

torch = pytest.importorskip("torch")


def _torch_top_p(scores, top_p, keep):  # transformers TopPLogitsWarper
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -keep:] = 0
    remove = remove.scatter(1, sorted_indices, remove)
    return scores.masked_fill(remove, -float("inf"))


def _torch_top_k(scores, top_k, keep):  # transformers TopKLogitsWarper
    k = min(max(top_k, keep), scores.size(-1))
    remove = scores < torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(remove, -float("inf"))


def _torch_penalty(input_ids, scores, penalty, window):  # upstream CustomRepetitionPenaltyLogitsProcessorRepeat
    if input_ids.size(1) > window:
        input_ids = input_ids.narrow(1, -window, window)
    freq = torch.nn.functional.one_hot(input_ids, scores.size(1)).sum(1)
    alpha = torch.pow(penalty, freq)
    return torch.where(scores < 0, scores * alpha, scores / alpha)


@pytest.mark.parametrize("seed", range(4))
def test_filters_match_the_upstream_processors(seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((4, 626)) * 4
    np.testing.assert_array_equal(top_p_filter(logits, 0.7, 3),
                                  _torch_top_p(torch.from_numpy(logits), 0.7, 3).numpy())
    np.testing.assert_array_equal(top_k_filter(logits, 20, 3), _torch_top_k(torch.from_numpy(logits), 20, 3).numpy())
    history = rng.integers(0, 626, (40, 4))
    ours = repetition_penalty(logits, history, 1.3, 16)
    ref = _torch_penalty(torch.from_numpy(history.T.copy()), torch.from_numpy(logits), 1.3, 16)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)  # torch.pow(float, int tensor) is float32


def test_sampling_keeps_to_the_filtered_codes():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 626)).astype(np.float32)
    params = SpeechParams(top_k=5, top_p=1.0, temperatures=(1.0, 1.0, 1.0, 1.0))
    allowed = np.argsort(-logits, axis=1)[:, :5]
    draws = np.stack([sample_step(logits, np.zeros((1, 4), np.int64), params, rng, first=False, block_end=False)
                      for _ in range(300)])
    for s in range(4):
        assert set(draws[:, s]) <= set(allowed[s]) and len(set(draws[:, s])) > 1
    first = np.stack([sample_step(logits, np.zeros((0, 4), np.int64), params, rng, first=True, block_end=True)
                      for _ in range(300)])
    assert len(set(first[:, 1])) > 5  # the first step is unfiltered (temperature only)
    assert (first != 625).all()


def test_handing_out_early_gives_upstreams_samples():
    """speak() hands out each chunk but its faded tail; joined, that is upstream's stream: whole
    chunks, each cross-faded with the next (here on a decoder whose chunks differ at the seams)."""
    model = FakeSpeechModel(end_after=90)
    model.mel_to_audio = lambda mel, n=[0]: (n.__setitem__(0, n[0] + 1) or
                                             np.repeat(mel[0], 256) + 0.01 * n[0]).astype(np.float32)
    ours = np.concatenate(list(speak(model, HIDDEN, "Hey.", SpeechParams(seed=2))))
    codes = np.concatenate(_codes_for(FakeSpeechModel(end_after=90), "Hey.", seed=2))
    ref, prev, calls = [], None, 0
    for i in range(0, len(codes), 25):
        ctx = min(4, i)
        calls += 1
        wav = (np.repeat(FakeSpeechModel().codes_to_mel(codes[i - ctx:i + 25])[0], 256) + 0.01 * calls)
        if prev is None:
            prev = wav
            continue
        out, prev = overlap_add(prev, wav, ctx * 512)
        ref.append(out)
    ref.append(prev)
    np.testing.assert_allclose(ours, np.concatenate(ref), rtol=0, atol=1e-6)


def _codes_for(model, text, seed):
    from minicpmo.runtime.speech import generate_codes

    return list(generate_codes(model, HIDDEN, text, SpeechParams(seed=seed), SpeechStats()))


def test_overlap_add_matches_upstream():
    def upstream(f0, f1, overlap):  # _linear_overlap_add2_wav, in torch
        total = f0.shape[-1] + f1.shape[-1] - overlap
        t = torch.linspace(0, 1, max(f0.shape[-1], f1.shape[-1]) + overlap + 2, dtype=torch.float64)[1:-1]
        w = 0.5 - (t - 0.5).abs()
        out, sw = torch.zeros(total, dtype=torch.float64), torch.zeros(total, dtype=torch.float64)
        out[:f0.shape[-1]] += w[-f0.shape[-1]:] * f0
        sw[:f0.shape[-1]] += w[-f0.shape[-1]:]
        off = f0.shape[-1] - overlap
        out[off:off + f1.shape[-1]] += w[:f1.shape[-1]] * f1
        sw[off:off + f1.shape[-1]] += w[:f1.shape[-1]]
        out = out / sw
        return out[:f0.shape[-1]], out[f0.shape[-1]:]

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(12800), rng.standard_normal(14848)
    ours = overlap_add(a, b, 2048)
    ref = upstream(torch.from_numpy(a), torch.from_numpy(b), 2048)
    for x, y in zip(ours, ref, strict=True):
        np.testing.assert_allclose(x, y.numpy(), rtol=1e-5, atol=1e-6)


# -- encoders and voices ---------------------------------------------------------------------------

def test_wav_and_pcm16_read_back():
    sf = pytest.importorskip("soundfile")
    x = (0.5 * np.sin(np.arange(24000) / 7)).astype(np.float32)
    data, rate = sf.read(io.BytesIO(wav_bytes(x, 24000)), dtype="float32")
    assert rate == 24000 and data.shape == x.shape
    np.testing.assert_allclose(data, x, atol=1 / 32767)
    streamed, rate = sf.read(io.BytesIO(wav_header(None, 24000) + pcm16(x[:1000]) + pcm16(x[1000:])),
                             dtype="float32")
    assert rate == 24000 and len(streamed) == len(x)
    assert np.frombuffer(pcm16(np.array([2.0, -2.0, 0.5])), "<i2").tolist() == [32767, -32767, 16384]


def test_reference_clip_errors(tmp_path):
    sf = pytest.importorskip("soundfile")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all" * 10)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(800, np.float32), 16000)
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(8000 * 3600, np.int16), 8000, subtype="PCM_16")  # one hour
    for path, words in [(empty, "empty"), (junk, "not a readable"), (short, "at least"), (long, "long")]:
        with pytest.raises(AudioError, match=words):
            reference_clip(path)
    with pytest.raises(AudioError):
        reference_clip(b"")
    ok = tmp_path / "ok.wav"
    sf.write(ok, (0.1 * np.sin(np.arange(24000) / 5)).astype(np.float32), 24000)
    assert len(reference_clip(ok)) == 16000


def test_voices_default_and_unknown(tmp_path):
    sf = pytest.importorskip("soundfile")
    sf.write(tmp_path / "anna.wav", (0.1 * np.sin(np.arange(32000) / 5)).astype(np.float32), 16000)
    voices = Voices(tmp_path, {"anna": "anna.wav"})
    assert voices.names == ["anna", "default"]
    assert voices.clip("default") is None and len(voices.clip("anna")) == 32000
    with pytest.raises(InputError, match="anna, default") as e:
        voices.clip("bob")
    assert e.value.code == "unknown_voice"
    msg = voice_message(np.zeros(10, np.float32))
    assert msg["role"] == "user" and [p["type"] for p in msg["content"]] == ["text", "audio", "text"]
    with pytest.raises(InputError, match="unknown voice mode"):
        voice_message(np.zeros(10, np.float32), mode="karaoke")
