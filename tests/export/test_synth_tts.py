"""The speech parts of synthetic checkpoints: tts.* tensors, the ChatTTS tokenizer, Vocos.pt in
torch's zip format (read and written without torch, checked against torch itself)."""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer

from minicpmo.cli.main import cli
from minicpmo.export.checkpoint import CheckpointError, open_checkpoint
from minicpmo.export.synth import write_synthetic_checkpoint
from minicpmo.export.synth_tts import BERT_VOCAB, CHATTTS_TOKENS, TOKENIZER_DIR, VOCOS_FILE, VOCOS_TINY
from minicpmo.export.torch_zip import TorchZipError, load_state_dict, save_state_dict
from minicpmo.export.tts_tensors import vocos_tensors

ALL_PARTS = ("vision", "resampler", "decoder", "audio", "tts")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("synth_tts") / "tiny", size="tiny", seed=3)


def test_torch_loads_what_the_writer_writes(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
               "c.scale": rng.standard_normal((2, 1, 5)).astype(np.float16), "d": np.zeros((0, 3), np.float32)}
    save_state_dict(tmp_path / "x.pt", tensors)
    for mmap in (False, True):  # upstream loads Vocos.pt with weights_only=True, mmap=True
        loaded = torch.load(tmp_path / "x.pt", weights_only=True, mmap=mmap)
        assert list(loaded) == list(tensors)
        for name, array in tensors.items():
            assert loaded[name].numpy().dtype == array.dtype and np.array_equal(loaded[name].numpy(), array)
    assert load_state_dict(tmp_path / "x.pt").keys() == tensors.keys()


def test_reader_reads_what_torch_saves(tmp_path):
    torch = pytest.importorskip("torch")
    state = {"w": torch.randn(4, 3).t(), "bf": torch.randn(6).bfloat16(), "h": torch.randn(2, 2).half(),
             "i": torch.arange(5), "shared_view": torch.arange(10.0)[2:8]}
    torch.save(state, tmp_path / "y.pt")
    read = load_state_dict(tmp_path / "y.pt")
    assert list(read) == list(state)
    for name, t in state.items():
        assert np.array_equal(read[name], t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()), name


def test_reader_refuses_what_a_state_dict_never_holds(tmp_path):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(print))
    with pytest.raises(TorchZipError, match="builtins.print"):
        load_state_dict(path)
    (tmp_path / "plain.pt").write_bytes(b"not a zip")
    with pytest.raises(TorchZipError, match="not a torch zip"):
        load_state_dict(tmp_path / "plain.pt")


def test_tiny_speech_parts_validate(tiny):
    ckpt = open_checkpoint(tiny)
    ckpt.validate(ALL_PARTS)
    tts = [k for k in ckpt.keys() if k.startswith("tts.")]
    assert tts == list(ckpt.tts_tensors()) and all(ckpt.dtype(k) == "BF16" for k in tts)
    cfg = ckpt.tts_config()
    assert cfg.llm_dim == ckpt.config.decoder.hidden_size and cfg.num_audio_tokens == 626 and cfg.num_vq == 4


def test_a_wrong_speech_shape_is_named(tiny, tmp_path, monkeypatch):
    ckpt = open_checkpoint(tiny)
    real = ckpt.tts_tensors()
    monkeypatch.setattr(type(ckpt), "tts_tensors",
                        lambda self: {**real, "tts.emb_text.weight": (21177, real["tts.emb_text.weight"][1])})
    with pytest.raises(CheckpointError, match="tts.emb_text.weight"):
        ckpt.validate(ALL_PARTS)


def test_chattts_tokenizer_has_the_real_size_and_ids(tiny):
    folder = tiny / TOKENIZER_DIR
    assert {p.name for p in folder.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size() == 21178
    ids = {t: tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[Stts]", "[Ptts]", "[Etts]", "[spk_emb]")}
    assert ids == {"[PAD]": 0, "[UNK]": 100, "[Stts]": 21131, "[Ptts]": 21132, "[Etts]": 21133, "[spk_emb]": 21143}
    assert [tok.token_to_id(t) for t in CHATTTS_TOKENS] == list(range(BERT_VOCAB, 21178))
    enc = tok.encode("[Stts][spk_emb]Hello world[Etts][PAD][Ptts]", add_special_tokens=False).ids
    assert enc[:2] == [21131, 21143] and enc[-3:] == [21133, 0, 21132] and 100 not in enc


def test_vocos_pt_is_the_upstream_state_dict(tiny):
    state = load_state_dict(tiny / VOCOS_FILE)
    assert {k: v.shape for k, v in state.items()} == vocos_tensors(VOCOS_TINY)
    assert all(v.dtype == np.float32 for v in state.values())
    window = state["head.istft.window"]
    assert window[0] == 0 and np.isclose(window[512], 1)  # torch.hann_window: periodic


def test_no_tts_leaves_the_speech_parts_out(tmp_path):
    out = tmp_path / "quiet"
    result = CliRunner().invoke(cli, ["synth", str(out), "--size", "tiny", "--no-tts"])
    assert result.exit_code == 0, result.output
    ckpt = open_checkpoint(out)
    assert not ckpt.has_tts() and not (out / "assets").exists()
    ckpt.validate(("vision", "resampler", "decoder", "audio"))
    with pytest.raises(CheckpointError, match="missing tensor 'tts"):
        ckpt.validate(ALL_PARTS)
    from minicpmo.export.bundle import export_bundle
    from minicpmo.export.options import ExportOptions

    bundle = export_bundle(out, tmp_path / "bundle", ExportOptions(precision="fp32", audio=False),
                           progress=lambda *a: None)
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    assert "speech" not in manifest and not list(bundle.glob("tts_*")) and not (bundle / "vocos.onnx").exists()


def test_speech_export_needs_the_assets(tiny, tmp_path):
    """A checkpoint with tts.* but no assets/Vocos.pt: one error naming the file and --no-tts."""
    import shutil

    from minicpmo.export.bundle import export_bundle
    from minicpmo.export.options import ExportOptions

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny, copy)
    (copy / VOCOS_FILE).unlink()
    with pytest.raises(ValueError, match="Vocos.pt.*--no-tts"):
        export_bundle(copy, tmp_path / "b", ExportOptions(precision="fp32", audio=False), progress=lambda *a: None)
    assert not (tmp_path / "b").exists()


def test_export_cli_speech_flags(tiny, tmp_path):
    runner = CliRunner()
    quiet = runner.invoke(cli, ["export", str(tiny), "-o", str(tmp_path / "quiet"), "--precision", "fp32", "--no-tts"])
    assert quiet.exit_code == 0, quiet.output
    assert "speech" not in json.loads((tmp_path / "quiet" / "manifest.json").read_text(encoding="utf-8"))
    loud = runner.invoke(cli, ["export", str(tiny), "-o", str(tmp_path / "int4"), "--precision", "fp32",
                               "--tts-precision", "int4"])
    assert loud.exit_code == 0, loud.output
    speech = json.loads((tmp_path / "int4" / "manifest.json").read_text(encoding="utf-8"))["speech"]
    assert speech["decoder"]["precision"] == speech["quantization"]["precision"] == "int4"
