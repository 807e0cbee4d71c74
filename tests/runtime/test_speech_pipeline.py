"""Speech through the pipeline on a tiny fp32 bundle, with a stand-in speech model: the speaker
condition is the fp32 reference's final hidden state at <|spk|>, greedy text is unchanged by
speaking, audio follows the text, and the errors (no speech model, unknown voice)."""

from __future__ import annotations

import numpy as np
import pytest
from speech_fakes import FakeSpeechModel

from minicpmo.runtime.errors import InputError
from minicpmo.runtime.pipeline import Pipeline
from minicpmo.runtime.speech import SpeechRequest
from minicpmo.runtime.types import GenerationParams
from synthetic_media import tone

GREEDY = GenerationParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def pipe(fp32_bundle):
    p = Pipeline.load(fp32_bundle, provider="cpu", context_length=1024)
    p.tts = FakeSpeechModel(llm_dim=p.manifest["decoder"]["hidden_size"], end_after=60)
    return p


def _run(pipe, messages, params=GREEDY, speech=None):
    chunks = list(pipe.generate(messages, params, speech))
    ids = [t for c in chunks for t in c.token_ids]
    return chunks, ids


def test_speaker_condition_is_the_reference_hidden_state_at_spk(pipe, tiny_checkpoint):
    torch = pytest.importorskip("torch")
    from minicpmo.export.hf_config import load_config
    from minicpmo.export.reference import load_weights
    from minicpmo.export.reference.decoder import decoder_hidden

    messages = [{"role": "user", "content": "Say something nice."}]
    pipe.tts.hiddens.clear()
    _run(pipe, messages, speech=SpeechRequest(seed=0))
    ids = np.asarray(pipe.last_prompt_ids)
    spk = int(np.flatnonzero(ids == pipe.tokenizer.token_to_id("<|spk|>"))[-1])
    assert spk == len(ids) - 3  # ...<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>
    weights = load_weights(tiny_checkpoint, prefixes=None)
    with torch.no_grad():
        embeds = torch.from_numpy(pipe.embed(ids)[None])
        ref = decoder_hidden(weights, load_config(tiny_checkpoint), embeds)[0, spk].numpy()
    np.testing.assert_allclose(pipe.tts.hiddens[-1], ref, atol=1e-4, rtol=0)
    # the same request again: the cache holds the whole prompt, the <|spk|> position still runs
    _run(pipe, messages, speech=SpeechRequest(seed=0))
    np.testing.assert_allclose(pipe.tts.hiddens[-1], ref, atol=1e-4, rtol=0)


def test_greedy_text_is_unchanged_by_speaking(pipe):
    # an audio question switches on the TTS template with or without speech, as upstream
    messages = [{"role": "user", "content": [{"type": "audio", "audio": tone(1.5)},
                                             {"type": "text", "text": "What did you hear?"}]}]
    plain = GenerationParams(max_tokens=12, temperature=0.0, cache_prompt=False)
    _, quiet = _run(pipe, messages, plain)
    chunks, spoken = _run(pipe, messages, plain, SpeechRequest(seed=3))
    assert quiet == spoken and len(quiet) > 0
    assert any(c.audio is not None for c in chunks)


def test_audio_follows_the_text_and_the_final_chunk_closes(pipe):
    chunks, _ = _run(pipe, [{"role": "user", "content": "Hello!"}], speech=SpeechRequest(seed=1))
    kinds = ["audio" if c.audio is not None else "final" if c.finish_reason else "text" for c in chunks]
    first_audio = kinds.index("audio")
    assert "text" not in kinds[first_audio:] and kinds[-1] == "final"
    stats = chunks[-1].usage.speech
    assert stats.codes > 0 and stats.audio_seconds == pytest.approx(
        sum(len(c.audio) for c in chunks if c.audio is not None) / 24000)
    text = "".join(c.text for c in chunks)
    assert len(pipe.tts.prefills[-1][0]) == 303 and (text.strip() != "" or stats.codes == 0)


def test_voices_and_bundles_without_speech(pipe, fp32_bundle):
    with pytest.raises(InputError, match="this model has: default") as e:
        next(pipe.generate([{"role": "user", "content": "hi"}], GREEDY, SpeechRequest(voice="nobody")))
    assert e.value.code == "unknown_voice"
    mute = Pipeline.load(fp32_bundle, provider="cpu", context_length=256)
    mute.tts = None
    with pytest.raises(InputError, match="cannot speak") as e:
        next(mute.generate([{"role": "user", "content": "hi"}], GREEDY, SpeechRequest()))
    assert e.value.code == "unsupported_audio_output"


def test_a_reference_clip_comes_first_as_upstream_puts_it(pipe):
    clip = tone(2.0, freq=220.0)
    _run(pipe, [{"role": "user", "content": "Hello!"}], speech=SpeechRequest(reference=clip, seed=0))
    text = pipe.tokenizer.decode(pipe.last_prompt_ids)
    assert text.index("Clone the voice in the provided audio prompt.") < text.index("<|audio_start|>") \
        < text.index("As an assistant, you will speak using this voice style.") < text.index("Hello!")


def test_the_bundles_speech_model_cuts_a_long_reply_and_says_so(fp32_bundle, caplog):
    """The tiny bundle's own TTS graphs and ChatTTS tokenizer: a reply past the 300-token reserve
    loses its end as upstream's prepare_tts_text cuts it, and a warning says so."""
    import logging

    from minicpmo.runtime.speech import SpeechParams, SpeechStats, speak

    pipe = Pipeline.load(fp32_bundle, provider="cpu", context_length=256)
    assert pipe._tts is None  # a pipeline that never speaks never loads the speech graphs
    hidden = np.random.default_rng(0).standard_normal(pipe.manifest["decoder"]["hidden_size"]).astype(np.float32)
    end_id = pipe.speech_info["text_eos_token_id"]
    for text, cut in (("hello there " * 200, True), ("hello there", False)):
        stats = SpeechStats()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="minicpmo.runtime.speech"):
            audio = list(speak(pipe.tts, hidden, text, SpeechParams(seed=0, max_codes=30), stats, end_id))
        assert stats.truncated_text is cut and ("speech text reserve" in caplog.text) is cut
        assert sum(len(a) for a in audio) == stats.codes * 512 > 0


def test_one_prefill_run_fills_the_cache_upstreams_chunks_fill(tmp_path_factory, tiny_checkpoint):
    """fp32 speech graphs: the condition prefilled in one run, then 6 steps, gives the logits that
    upstream's 12-then-10-position chunks give (up to summation order)."""
    from minicpmo.export.bundle import export_bundle
    from minicpmo.export.options import ExportOptions
    from minicpmo.runtime.manifest import load_manifest
    from minicpmo.runtime.speech import prefill_condition
    from minicpmo.runtime.tts_model import TTSModel

    out = tmp_path_factory.mktemp("bundles") / "tiny-tts-fp32"
    export_bundle(tiny_checkpoint, out, ExportOptions(precision="fp32", tts_precision="fp32", audio=False),
                  progress=lambda *a: None)
    tts = TTSModel.load(load_manifest(out))
    ids, mask = tts.text_input("Hello there, how are you today? The weather is fine.")
    spk = tts.speaker_embedding(np.random.default_rng(1).standard_normal(tts.cfg.llm_dim).astype(np.float32))
    runs = []
    for in_chunks in (True, False):
        prefill_condition(tts, ids, spk, mask, in_chunks)
        logits, codes = [], None
        for _ in range(6):
            logits.append(tts.step(codes).copy())
            codes = logits[-1][:, :625].argmax(axis=1)
        runs.append(np.stack(logits))
    np.testing.assert_allclose(runs[1], runs[0], atol=1e-4, rtol=0)
