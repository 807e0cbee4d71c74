"""`--speak` / `--voice` end to end on a tiny synthetic bundle with speech (synth --size tiny, then
export): a 24 kHz WAV, the same greedy text as without speech, voices, chat's reply-N.wav files, and
what fails as one error line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli import minicpmo

from synthetic_media import tone

sf = pytest.importorskip("soundfile")


@pytest.fixture(scope="module")
def mute_bundle(tmp_path_factory, tiny_checkpoint):
    from minicpmo.export.bundle import export_bundle
    from minicpmo.export.options import ExportOptions

    out = tmp_path_factory.mktemp("bundles") / "tiny-no-tts"
    return export_bundle(tiny_checkpoint, out, ExportOptions(precision="fp32", tts=False), progress=lambda *a: None)


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "question.wav"
    sf.write(path, tone(1.5), 16000)
    return path


def test_infer_speak_writes_a_wav_and_keeps_the_greedy_text(fp32_bundle, question, tmp_path):
    # an audio question uses the TTS template with or without --speak: the text must not change
    args = ["infer", "--model", fp32_bundle, "--audio", question, "--prompt", "What is it?", "--max-tokens", "8",
            "--json"]
    quiet = json.loads(minicpmo(*args).stdout)
    out = tmp_path / "reply.wav"
    spoken = json.loads(minicpmo(*args, "--speak", out, "--seed", "1").stdout)
    assert spoken["token_ids"] == quiet["token_ids"] and spoken["text"] == quiet["text"]
    samples, rate = sf.read(out, dtype="float32")
    assert rate == 24000 and abs(len(samples) - spoken["audio"]["seconds"] * 24000) <= 24  # seconds: 3 decimals
    assert spoken["audio"]["codes"] * 512 == len(samples) and np.abs(samples).max() > 0
    assert not list(tmp_path.glob(".*.part"))


def test_infer_speak_in_the_voice_of_a_clip(fp32_bundle, tmp_path):
    from minicpmo.runtime.tokenizer import Tokenizer

    tok = Tokenizer(fp32_bundle / "tokenizer.json")
    voice = tmp_path / "me.wav"
    sf.write(voice, tone(2.0, freq=200.0), 16000)
    args = ["infer", "--model", fp32_bundle, "--prompt", "Hi.", "--max-tokens", "4", "--json", "--speak"]
    plain = json.loads(minicpmo(*args, tmp_path / "a.wav").stdout)
    voiced = json.loads(minicpmo(*args, tmp_path / "b.wav", "--voice", voice).stdout)
    spk = [tok.token_to_id(t) for t in ("<|spk_bos|>", "<|spk|>", "<|spk_eos|>", "<|tts_bos|>")]
    assert plain["prompt_token_ids"][-4:] == spk == voiced["prompt_token_ids"][-4:]
    audio_start = tok.token_to_id("<|audio_start|>")
    assert audio_start in voiced["prompt_token_ids"] and audio_start not in plain["prompt_token_ids"]
    assert (tmp_path / "b.wav").is_file()


def test_chat_speak_writes_one_file_per_reply(fp32_bundle, tmp_path):
    proc = minicpmo("chat", "--model", fp32_bundle, "--speak", "--speak-dir", tmp_path, "--max-tokens", "4",
                    input="Hello\n\\voice nobody\nAgain\n")
    assert (tmp_path / "reply-1.wav").is_file() and (tmp_path / "reply-2.wav").is_file()
    assert f"wrote {tmp_path / 'reply-1.wav'}" in proc.stderr
    assert "unknown voice 'nobody'; this model has: default" in proc.stderr
    assert sf.info(tmp_path / "reply-2.wav").samplerate == 24000


@pytest.mark.parametrize("extra, message", [
    (["--voice", "me.wav"], "--voice needs --speak"),
    (["--speak", "out.wav", "--voice", "missing.wav"], "no such audio file"),
    (["--speak", "out.wav", "--voice", "nobody"], "unknown voice 'nobody'"),
])
def test_speak_usage_errors(fp32_bundle, extra, message):
    proc = minicpmo("infer", "--model", fp32_bundle, "--prompt", "hi", "--max-tokens", "2", *extra, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_speak_on_a_bundle_without_speech_is_an_error(mute_bundle, tmp_path):
    out = tmp_path / "out.wav"
    proc = minicpmo("infer", "--model", mute_bundle, "--prompt", "hi", "--max-tokens", "3", "--speak", out,
                    check=False)
    assert proc.returncode == 1 and "cannot speak" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    proc = minicpmo("chat", "--model", mute_bundle, "--speak", "--speak-dir", tmp_path, check=False, input="hi\n")
    assert proc.returncode == 1 and "cannot speak" in proc.stderr


def test_export_carries_voices_and_infer_speaks_in_them(tiny_checkpoint, tmp_path):
    anna = tmp_path / "anna.wav"
    sf.write(anna, tone(2.0, freq=300.0), 16000)
    bundle = tmp_path / "voiced"
    minicpmo("export", tiny_checkpoint, "-o", bundle, "--precision", "fp32", "--voice", f"anna={anna}",
             "--voice", f"default={anna}")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["speech"]["voices"] == {"anna": "voice-anna.wav", "default": "voice-default.wav"}
    assert "voice-anna.wav" in manifest["files"]  # covered by the digests like every other file
    out = json.loads(minicpmo("infer", "--model", bundle, "--prompt", "Hi.", "--max-tokens", "3", "--speak",
                              tmp_path / "a.wav", "--voice", "anna", "--json").stdout)
    from minicpmo.runtime.tokenizer import Tokenizer

    assert Tokenizer(bundle / "tokenizer.json").token_to_id("<|audio_start|>") in out["prompt_token_ids"]
    bad = minicpmo("export", tiny_checkpoint, "-o", tmp_path / "no", "--voice", f"x={tmp_path / 'nope.wav'}",
                   check=False)
    assert bad.returncode == 1 and "no such audio file" in bad.stderr and not (tmp_path / "no").exists()
