"""The speech graphs against the PyTorch reference (export/reference/tts.py) on the tiny checkpoint:
the TTS decoder teacher-forced and greedy, the DVAE decoder and Vocos, the int8 decoder's error, and
runtime.tts_model's text condition and streaming mask."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from minicpmo.export.checkpoint import open_checkpoint  # noqa: E402
from minicpmo.export.reference import tts as R  # noqa: E402
from minicpmo.export.reference.weights import load_weights  # noqa: E402
from minicpmo.export.torch_zip import load_state_dict  # noqa: E402
from minicpmo.runtime.errors import BundleError, InputError  # noqa: E402
from minicpmo.runtime.manifest import load_manifest  # noqa: E402
from minicpmo.runtime.tts_model import TTSModel  # noqa: E402

TEXT = "hello world, good morning! thank you for the answer"
STEPS = 120  # past 2 x 50 code frames: two more chunks of text get unlocked on the way


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The reference runs thousands of tiny ops: threads only add contention (60x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    vocos = {k: torch.from_numpy(v) for k, v in load_state_dict(tiny_checkpoint / "assets" / "Vocos.pt").items()}
    return load_weights(tiny_checkpoint, ("tts.",)), ckpt.tts_config(), vocos


@pytest.fixture(scope="module")
def fp32_speech_bundle(tmp_path_factory, tiny_checkpoint):
    from minicpmo.export.bundle import export_bundle
    from minicpmo.export.options import ExportOptions

    out = tmp_path_factory.mktemp("speech") / "tts-fp32"
    return export_bundle(tiny_checkpoint, out, ExportOptions(precision="fp32", tts_precision="fp32"),
                         progress=lambda *a: None)


@pytest.fixture(scope="module")
def fp32_speech(fp32_speech_bundle):
    return TTSModel.load(load_manifest(fp32_speech_bundle))


def _condition(model, reference, seed=0):
    w, cfg, _ = reference
    ids, mask = model.text_input(TEXT)
    hidden = np.random.default_rng(seed).standard_normal(cfg.llm_dim).astype(np.float32)
    return ids, mask, hidden, R.speaker_embedding(w, torch.from_numpy(hidden))


def _teacher_forced(model, reference, seed=0):
    """(graph logits, reference logits), [STEPS, 4, 626] each, fed the reference's greedy codes."""
    w, cfg, _ = reference
    ids, mask, hidden, spk_ref = _condition(model, reference, seed)
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    codes = R.greedy_codes(w, cfg, t_ids, t_mask, spk_ref, STEPS)
    want = R.teacher_forced_logits(w, cfg, t_ids, t_mask, spk_ref, codes).numpy()
    model.prefill(ids, model.speaker_embedding(hidden), mask)
    got = np.stack([model.step(None if n == 0 else codes[n - 1].numpy()) for n in range(STEPS)])
    return got, want


def test_speaker_embedding_matches_the_projector(fp32_speech, reference):
    w, cfg, _ = reference
    hidden = np.random.default_rng(1).standard_normal(cfg.llm_dim).astype(np.float32)
    got = fp32_speech.speaker_embedding(hidden)
    assert got.shape == (cfg.hidden_size,) and np.isclose(np.linalg.norm(got), 1, atol=1e-6)
    np.testing.assert_allclose(got, R.speaker_embedding(w, torch.from_numpy(hidden)).numpy(), atol=1e-6)


def test_fp32_decoder_logits_match_the_reference_per_step(fp32_speech, reference):
    got, want = _teacher_forced(fp32_speech, reference)
    assert fp32_speech.position == reference[1].condition_length - 1 + STEPS
    per_step = np.abs(got - want).reshape(STEPS, -1).max(axis=1)
    assert per_step.max() <= 1e-4, f"worst step {per_step.argmax()}: {per_step.max():.2e}"


def test_fp32_greedy_code_streams_identical_for_100_steps(fp32_speech, reference):
    w, cfg, _ = reference
    ids, mask, hidden, spk_ref = _condition(fp32_speech, reference, seed=2)
    want = R.greedy_codes(w, cfg, torch.from_numpy(ids), torch.from_numpy(mask), spk_ref, 100).numpy()
    fp32_speech.prefill(ids, fp32_speech.speaker_embedding(hidden), mask)
    codes = [fp32_speech.step(None).argmax(-1)]
    for _ in range(99):
        codes.append(fp32_speech.step(codes[-1]).argmax(-1))
    np.testing.assert_array_equal(np.stack(codes), want)


def test_streamed_prefill_equals_one_call(fp32_speech, reference):
    """prefill in upstream's chunks of 10, in one pass, and prefill_text chunk by chunk with the mask set
    afterwards (as streaming text arrives) give the same logits."""
    ids, mask, hidden, _ = _condition(fp32_speech, reference)
    spk = fp32_speech.speaker_embedding(hidden)
    fp32_speech.prefill(ids, spk, mask)
    whole = fp32_speech.step(None)
    fp32_speech.prefill(ids, spk, mask, chunk_size=None)
    np.testing.assert_allclose(fp32_speech.step(None), whole, atol=1e-5)
    fp32_speech.truncate(0)
    for start in range(0, 302, 7):
        fp32_speech.prefill_text(ids[start:min(start + 7, 302)], start, spk)
    fp32_speech.set_text_mask(mask)
    np.testing.assert_allclose(fp32_speech.step(None), whole, atol=1e-5)


def test_the_cache_grows_without_changing_the_logits(fp32_speech_bundle, fp32_speech, reference, monkeypatch):
    """Past its first FIRST_CODES frames the cache moves to bigger buffers: the same logits as one that
    never moves; past max_codes a step is refused."""
    import minicpmo.runtime.tts_model as tts_model

    ids, mask, hidden, _ = _condition(fp32_speech, reference)
    spk = fp32_speech.speaker_embedding(hidden)
    monkeypatch.setattr(tts_model, "FIRST_CODES", 8)
    small = TTSModel.load(load_manifest(fp32_speech_bundle), max_codes=40)
    start = small.kv.capacity
    for model in (small, fp32_speech):
        model.prefill(ids, spk, mask)
    codes, got, want = None, [], []
    for _ in range(40):
        got.append(small.step(codes))
        want.append(fp32_speech.step(codes))
        codes = want[-1].argmax(-1)
    assert small.kv.capacity > start and small.position == 302 + 40
    np.testing.assert_allclose(np.stack(got), np.stack(want), atol=1e-5)
    with pytest.raises(InputError, match="TTS cache holds at most"):
        small.step(codes)


def test_dvae_and_vocos_match_the_reference(fp32_speech, reference):
    w, _, vocos = reference
    codes = np.random.default_rng(3).integers(0, 625, (41, 4))
    mel = fp32_speech.codes_to_mel(codes)
    want = R.dvae_decode(w, torch.from_numpy(codes.T[None].copy()))[0].numpy()
    assert mel.shape == (100, 82)
    assert np.abs(mel - want).max() <= 1e-4 * np.abs(want).max()
    wave = fp32_speech.mel_to_audio(want)
    want_wave = R.vocos_decode(vocos, torch.from_numpy(want[None]))[0].numpy()
    assert wave.shape == (82 * 256,) and wave.dtype == np.float32
    assert np.abs(wave - want_wave).max() <= 1e-4 * np.abs(want_wave).max()


def test_int8_decoder_error_is_reported_and_small(fp32_bundle, reference):
    """int8 weights (the default): every quantized tensor's error is in the manifest, and the logits
    keep the fp32 reference's direction at every step (cosine; int8 moves weights by ~0.5%)."""
    manifest = load_manifest(fp32_bundle)
    q = manifest["speech"]["quantization"]
    layers = reference[1].num_hidden_layers
    assert q["precision"] == "int8" and len(q["per_tensor"]) == 4 * layers + 1
    assert 0 < q["relative_error_max"] < 0.02
    got, want = _teacher_forced(TTSModel.load(manifest), reference, seed=4)
    a, b = got.reshape(STEPS * 4, -1), want.reshape(STEPS * 4, -1)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.995, cosine.min()


def test_int4_decoder_exports_and_keeps_the_logits_direction(tmp_path, tiny_checkpoint, reference):
    """--tts-precision int4 (MatMulNBits 4-bit, ~10% per weight): its errors reported, logits cosine > 0.95."""
    from minicpmo.export.bundle import export_bundle
    from minicpmo.export.options import ExportOptions

    out = export_bundle(tiny_checkpoint, tmp_path / "tts-int4", ExportOptions(precision="fp32", tts_precision="int4"),
                        progress=lambda *a: None)
    manifest = load_manifest(out)
    q = manifest["speech"]["quantization"]
    assert q["precision"] == "int4" and manifest["speech"]["decoder"]["precision"] == "int4"
    assert 0.02 < q["relative_error_mean"] < 0.2
    got, want = _teacher_forced(TTSModel.load(manifest), reference, seed=5)
    a, b = got.reshape(STEPS * 4, -1), want.reshape(STEPS * 4, -1)
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() > 0.95


def test_text_input_reserves_300_and_truncates_as_upstream(fp32_speech):
    ids, mask = fp32_speech.text_input("hello world")
    sp = fp32_speech.cfg.special_ids
    n = len(fp32_speech.tokenizer.encode("hello world", add_special_tokens=False).ids)
    assert ids.shape == mask.shape == (303,) and ids.dtype == np.int64 and mask.dtype == np.int8
    assert ids[0] == sp["[Stts]"] and ids[1] == sp["[spk_emb]"] and ids[2 + n] == sp["[Etts]"]
    assert (ids[3 + n:302] == sp["[PAD]"]).all() and ids[302] == sp["[Ptts]"]
    assert mask[:3 + n].all() and not mask[3 + n:302].any() and mask[302] == 1
    long_ids, long_mask = fp32_speech.text_input("hello " * 400)
    assert long_ids.shape == (303,) and sp["[Etts]"] not in long_ids and long_mask.all()


def test_generation_mask_is_upstreams(fp32_speech, reference):
    _, cfg, _ = reference
    _, mask = fp32_speech.text_input(TEXT)
    fp32_speech.set_text_mask(mask)
    for past in (302, 303, 351, 352, 353, 402, 403, 900, 3000):
        want = R.generation_bias(cfg, past, torch.from_numpy(mask))[0, 0, 0].numpy()
        np.testing.assert_array_equal(fp32_speech.generation_bias(past), want)


def test_bad_input_is_refused(fp32_speech):
    with pytest.raises(InputError, match="codes"):
        fp32_speech.step(np.array([1, 2, 3, 626]))
    with pytest.raises(InputError, match="end code"):
        fp32_speech.codes_to_mel(np.full((3, 4), 625))
    with pytest.raises(InputError, match="width"):
        fp32_speech.speaker_embedding(np.zeros(7, np.float32))
    with pytest.raises(InputError, match="position"):
        fp32_speech.prefill_text(np.array([1, 2]), start=fp32_speech.position + 5)
    assert fp32_speech.codes_to_mel(np.zeros((0, 4), np.int64)).shape == (100, 0)


def test_no_tts_bundle_has_no_speech(tmp_path, tiny_checkpoint):
    from minicpmo.export.bundle import export_bundle
    from minicpmo.export.options import ExportOptions

    out = export_bundle(tiny_checkpoint, tmp_path / "quiet", ExportOptions(precision="fp32", tts=False),
                        progress=lambda *a: None)
    manifest = load_manifest(out)
    assert "speech" not in manifest.data and not (out / "tts_decoder.onnx").exists()
    with pytest.raises(BundleError, match="no speech model"):
        TTSModel.load(manifest)
