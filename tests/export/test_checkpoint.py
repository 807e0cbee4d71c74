"""Checkpoint reader: reading any upstream-format checkpoint, and one precise error per kind of damage."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from minicpmo.export.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    expected_tensors,
    open_checkpoint,
)
from minicpmo.export.hf_config import ConfigError
from minicpmo.export.synth import write_synthetic_checkpoint


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="module")
def tensors(source) -> dict[str, np.ndarray]:
    ckpt = open_checkpoint(source)
    return {k: ckpt.read(k) for k in ckpt.keys()}


@pytest.fixture
def ck(source, tmp_path) -> Path:
    """A private copy of the tiny checkpoint to damage."""
    return Path(shutil.copytree(source, tmp_path / "ck"))


def _resave(folder: Path, tensors: dict[str, np.ndarray], dtype=None) -> None:
    """Replace the weights with one file written by another tool (safetensors.numpy); dtype None keeps each."""
    for p in folder.glob("*.safetensors"):
        p.unlink()
    save_file({k: np.ascontiguousarray(v if dtype is None else v.astype(dtype)) for k, v in tensors.items()},
              str(folder / "model.safetensors"), metadata={"format": "np", "written_by": "another tool"})


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def _errors(folder: Path, parts=("vision", "resampler", "decoder", "audio")) -> str:
    with pytest.raises((CheckpointError, ConfigError)) as e:
        open_checkpoint(folder).validate(parts=parts)
    return str(e.value)


# ---------------------------------------------------------------- reading what other tools write

@pytest.mark.parametrize("dtype,name", [(np.float32, "F32"), (np.float16, "F16")])
def test_other_tool_dtypes_read_fine(ck, tensors, dtype, name):
    reordered = dict(reversed(list(tensors.items())))
    _resave(ck, reordered, dtype)
    ckpt = open_checkpoint(ck)
    ckpt.validate()
    assert ckpt.dtype("resampler.proj") == name
    for k in ("resampler.proj", "llm.model.embed_tokens.weight", "apm.conv1.weight"):
        got = ckpt.read(k)
        assert got.dtype == np.float32 and got.shape == tensors[k].shape
        assert np.array_equal(got, tensors[k].astype(dtype).astype(np.float32))


def test_other_sharding_with_hand_written_index(ck, tensors):
    for p in ck.glob("*.safetensors"):
        p.unlink()
    names = sorted(tensors)  # alphabetical split: nothing like the upstream order
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(ck / file))
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (ck / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 1, "extra": "x"}, "weight_map": weight_map}))
    ckpt = open_checkpoint(ck)
    ckpt.validate()
    assert set(ckpt.keys()) == set(tensors)
    assert np.array_equal(ckpt.read("vpm.post_layernorm.weight"), tensors["vpm.post_layernorm.weight"])
    assert ckpt.identity()["files"] == ["a.safetensors", "b.safetensors"]


def test_sharded_synthetic_checkpoint_reads(tmp_path, tensors):
    out = write_synthetic_checkpoint(tmp_path / "sh", size="tiny", seed=0, max_shard_bytes=500_000)
    ckpt = open_checkpoint(out)
    ckpt.validate()
    assert len(ckpt.identity()["files"]) > 2
    for k in ("llm.model.embed_tokens.weight", "apm.layer_norm.bias", "tts.dvae.coef"):
        assert np.array_equal(ckpt.read(k), tensors[k])


def test_identity_and_tokenizer_files(source):
    ckpt = open_checkpoint(source)
    ident = ckpt.identity()
    assert ident["config_sha256"] == hashlib.sha256((source / "config.json").read_bytes()).hexdigest()
    assert ident["index_sha256"] is None and ident["dtypes"] == ["BF16"]
    assert ident["tensor_bytes"] == sum(2 * int(np.prod(ckpt.shape(k))) for k in ckpt.keys())
    json.dumps(ident)
    assert {p.name for p in ckpt.tokenizer_files()} >= {"tokenizer.json", "tokenizer_config.json"}


def test_hub_cache_folder_tells_its_origin(source, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / "models--openbmb--MiniCPM-o-2_6" / "snapshots" / commit
    shutil.copytree(source, folder)
    ident = open_checkpoint(folder).identity()
    assert (ident["hub_id"], ident["revision"]) == ("openbmb/MiniCPM-o-2_6", commit)


def test_tts_and_unrequested_audio_keys_are_ignored(ck, tensors):
    extra = dict(tensors)
    extra["tts.something.new"] = np.zeros(3, np.float32)
    extra["apm.layers.0.self_attn.k_proj.bias"] = np.zeros(3, np.float32)
    _resave(ck, extra)
    open_checkpoint(ck).validate(parts=("vision", "resampler", "decoder"))
    assert "unexpected tensor 'apm.layers.0.self_attn.k_proj.bias'" in _errors(ck)


# ---------------------------------------------------------------- one precise error per problem

def test_missing_tensor(ck, tensors):
    _resave(ck, {k: v for k, v in tensors.items() if k != "llm.model.layers.1.mlp.up_proj.weight"})
    assert _errors(ck) == "missing tensor 'llm.model.layers.1.mlp.up_proj.weight'"


def test_missing_audio_tensor_only_matters_with_audio(ck, tensors):
    _resave(ck, {k: v for k, v in tensors.items() if not k.startswith("apm.")})
    open_checkpoint(ck).validate(parts=("vision", "resampler", "decoder"))
    assert _errors(ck) == "missing tensor 'apm.conv1.weight'"


def test_wrong_shape(ck, tensors):
    _resave(ck, {**tensors, "vpm.post_layernorm.weight": np.ones(63, np.float32)})
    assert _errors(ck) == "tensor 'vpm.post_layernorm.weight' has shape [63], expected [64]"


def test_truncated_file(ck):
    path = ck / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    msg = _errors(ck)
    assert msg.startswith("model.safetensors: truncated: header says ")
    assert "bytes of data, file has" in msg


def test_truncated_inside_the_header(ck):
    path = ck / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    assert "model.safetensors: truncated: header says" in _errors(ck)
    path.write_bytes(b"\x01\x02")
    assert "model.safetensors: truncated" in _errors(ck)


def test_bad_header_json(ck):
    path = ck / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"{not json!!!"
    path.write_bytes(bytes(data))
    assert "model.safetensors: header is not valid JSON" in _errors(ck)


def test_header_sizes_must_match_dtype_and_shape(ck, tensors):
    _write_raw(ck / "model.safetensors", {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8)
    assert "tensor 'x': 8 bytes of data, but F32 [4] needs 16" in _errors(ck)


def test_index_points_to_missing_shard(tmp_path):
    out = write_synthetic_checkpoint(tmp_path / "sh", size="tiny", seed=0, max_shard_bytes=1_000_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    msg = _errors(out)
    assert msg.startswith(f"{INDEX_FILE}: weight_map points to missing file '{victim.name}'")


def test_index_names_a_tensor_its_shard_lacks(tmp_path):
    out = write_synthetic_checkpoint(tmp_path / "sh", size="tiny", seed=0, max_shard_bytes=1_000_000)
    index = json.loads((out / INDEX_FILE).read_text())
    index["weight_map"]["llm.model.norm.weight"] = "model-00001-of-" + sorted(
        out.glob("model-*.safetensors"))[0].name.split("-of-")[1]
    index["weight_map"]["ghost.weight"] = index["weight_map"]["llm.model.norm.weight"]
    (out / INDEX_FILE).write_text(json.dumps(index))
    assert "has no such tensor" in _errors(out)


def test_bad_index_json(tmp_path):
    out = write_synthetic_checkpoint(tmp_path / "sh", size="tiny", seed=0, max_shard_bytes=1_000_000)
    (out / INDEX_FILE).write_text("{")
    assert _errors(out).startswith(f"{INDEX_FILE}: not a valid index")


@pytest.mark.parametrize("dtype,label", [(np.int8, "I8"), (np.float64, "F64")])
def test_unsupported_dtype(ck, tensors, dtype, label):
    _resave(ck, {**tensors, "resampler.ln_q.bias": tensors["resampler.ln_q.bias"].astype(dtype)})
    assert _errors(ck) == f"tensor 'resampler.ln_q.bias' has dtype {label}; supported: BF16, F16, F32"


def test_unknown_dtype(ck, tensors):
    ckpt = open_checkpoint(ck)
    header = {}
    data = b""
    for k in ckpt.keys():
        raw = tensors[k].astype(np.float32).tobytes()
        header[k] = {"dtype": "F32", "shape": list(ckpt.shape(k)), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    header["llm.model.norm.weight"]["dtype"] = "Q4"
    _write_raw(ck / "model.safetensors", header, data)
    assert _errors(ck) == "tensor 'llm.model.norm.weight' has unknown dtype 'Q4'"
    with pytest.raises(CheckpointError, match="unknown dtype 'Q4'"):
        open_checkpoint(ck).read("llm.model.norm.weight")


def test_unexpected_key(ck, tensors):
    _resave(ck, {**tensors, "vpm.extra.weight": np.zeros(2, np.float32)})
    assert _errors(ck) == "unexpected tensor 'vpm.extra.weight' in model.safetensors"


def test_config_field_out_of_range(ck):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["hidden_size"] = 200
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="multiple of 128"):
        open_checkpoint(ck)


def test_audio_projector_width_must_follow_the_encoder(ck):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["audio_config"]["encoder_ffn_dim"] = 512
    (ck / "config.json").write_text(json.dumps(cfg))
    assert "encoder_ffn_dim // 4 = 128 must equal d_model 64" in _errors(ck)


def test_tied_embeddings_need_no_lm_head(ck, tensors):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (ck / "config.json").write_text(json.dumps(cfg))
    open_checkpoint(ck).validate()  # lm_head kept: tolerated
    _resave(ck, {k: v for k, v in tensors.items() if k != "llm.lm_head.weight"})
    open_checkpoint(ck).validate()


def test_no_weights_and_missing_paths(tmp_path, source):
    (tmp_path / "cfg").mkdir()
    shutil.copy(source / "config.json", tmp_path / "cfg" / "config.json")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        open_checkpoint(tmp_path / "cfg")
    with pytest.raises(CheckpointError, match="no such folder"):
        open_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a folder"):
        open_checkpoint(source / "config.json")
    with pytest.raises(CheckpointError, match="unknown part"):
        open_checkpoint(source).validate(parts=("vision", "speech"))
    with pytest.raises(CheckpointError, match="missing tensor 'nope'"):
        open_checkpoint(source).read("nope")


def test_hub_id_offline_gives_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"), raising=False)
    with pytest.raises(CheckpointError, match="downloading it from the Hugging Face Hub failed"):
        open_checkpoint("nobody-here/no-such-model")


def test_expected_tensors_table_invariants(source):
    cfg = open_checkpoint(source).config
    t = expected_tensors(cfg)
    d = cfg.decoder.hidden_size
    assert t["resampler.proj"] == (d, d) and t["resampler.attn.in_proj_weight"] == (3 * d, d)
    assert t["resampler.kv_proj.weight"] == (d, cfg.vision.hidden_size)
    assert "apm.layers.0.self_attn.k_proj.bias" not in t and "apm.layers.0.self_attn.q_proj.bias" in t
    assert t["audio_projection_layer.linear1.weight"] == (d, cfg.audio.encoder_ffn_dim // 4)
    assert not any("avg_pool" in k for k in t)
    assert set(expected_tensors(cfg, ("decoder",))) < set(t)
