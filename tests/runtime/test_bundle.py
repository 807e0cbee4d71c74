"""A bundle with a file missing, truncated or altered is refused with a message naming the file; an
export never leaves a half-written bundle behind."""

from __future__ import annotations

import json
import shutil

import pytest

from minicpmo.runtime.errors import BundleError
from minicpmo.runtime.manifest import load_manifest
from minicpmo.runtime.pipeline import Pipeline


@pytest.fixture
def bundle_copy(int4_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(int4_bundle, dst)
    return dst


def test_manifest_describes_every_file(int4_bundle):
    m = load_manifest(int4_bundle, verify=True)
    names = {p.name for p in int4_bundle.iterdir()} - {"manifest.json"}
    assert set(m["files"]) == names
    assert m["decoder"]["num_layers"] >= 1 and m["tokenizer"]["stop_token_ids"]
    assert {i["name"] for i in m["decoder"]["inputs"]} >= {"inputs_embeds", "seqlens_k", "total_sequence_length"}
    assert 0 < m["quantization"]["relative_error_max"] < 0.2  # int4 block 32 on random weights: ~8%


@pytest.mark.parametrize("name", ["decoder.onnx", "vision.onnx.data", "tokenizer.json", "embed_tokens.npy"])
def test_missing_file(bundle_copy, name):
    (bundle_copy / name).unlink()
    with pytest.raises(BundleError, match=f"'{name}'.*missing"):
        Pipeline.load(bundle_copy)


def test_truncated_file(bundle_copy):
    data = bundle_copy / "decoder.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(BundleError, match="decoder.onnx.data.*bytes"):
        Pipeline.load(bundle_copy)


@pytest.mark.parametrize("name", ["vision.onnx", "chat_template.jinja", "decoder.onnx.data"])
def test_altered_file(bundle_copy, name):
    path = bundle_copy / name
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=f"'{name}'.*sha256"):
        Pipeline.load(bundle_copy, verify=True)


@pytest.fixture
def manifest_view(int4_bundle, tmp_path):
    """The bundle's files linked, its manifest copied: a manifest to edit without copying the weights."""
    dst = tmp_path / "view"
    dst.mkdir()
    for f in int4_bundle.iterdir():
        if f.name == "manifest.json":
            shutil.copy(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f)
    return dst


EDITS = [("decoder", "num_layers", 3, "decoder.num_layers is 3, but decoder.onnx has 2"),
         ("decoder", "vocab_size", 7, "decoder.vocab_size is 7, but decoder.onnx has"),
         ("decoder", "num_kv_heads", 5, "decoder.num_kv_heads is 5"),
         ("decoder", "kv_dtype", "float16", "decoder.kv_dtype is 'float16'"),
         ("preprocessing", "patch_size", 16, "preprocessing.patch_size is 16, but vision.onnx has 14"),
         ("preprocessing", "query_num", 32, "preprocessing.query_num is 32"),
         ("vision", "output_name", "embeds", "vision.output_name names 'embeds'")]


@pytest.mark.parametrize("section, field, value, graph_message", EDITS)
def test_an_edited_manifest_field_is_named(manifest_view, section, field, value, graph_message):
    from minicpmo.runtime.manifest import write_manifest

    path = manifest_view / "manifest.json"
    data = json.loads(path.read_text())
    data[section][field] = value
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(BundleError, match=f"field '{section}.{field}' differs from its digest"):
        Pipeline.load(manifest_view)
    write_manifest(manifest_view, data)  # digests that agree: the graphs themselves disagree
    with pytest.raises(BundleError, match=graph_message):
        Pipeline.load(manifest_view)
    del data["digests"]  # a manifest without digests is checked against the graphs as well
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=graph_message):
        Pipeline.load(manifest_view)


@pytest.mark.parametrize("old, new, message", [
    ('"num_layers"', '"num_layerz"', "field 'decoder.num_layers' is missing"),
    ('"patch_size": 14', '"patch_size": 15', "field 'preprocessing.patch_size' differs"),
    ('"stop_token_ids": [', '"stop_token_ids": [1, ', "field 'tokenizer.stop_token_ids' differs"),
    ('"format_version": 1,', '"format_version": 1, "extra": 2,', "field 'extra' was added after export"),
])
def test_a_flipped_manifest_byte_is_named(manifest_view, old, new, message):
    path = manifest_view / "manifest.json"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))  # the first occurrence: the field, not its digest
    with pytest.raises(BundleError, match=message):
        Pipeline.load(manifest_view)


def test_a_missing_field_is_named_not_a_key_error(manifest_view):
    path = manifest_view / "manifest.json"
    data = json.loads(path.read_text())
    del data["digests"], data["decoder"]["head_dim"]
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="missing field 'decoder.head_dim'"):
        Pipeline.load(manifest_view)


def test_manifest_problems(bundle_copy, tmp_path):
    manifest = bundle_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(BundleError, match="format_version"):
        Pipeline.load(bundle_copy)
    manifest.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Pipeline.load(bundle_copy)
    manifest.unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        Pipeline.load(bundle_copy)
    with pytest.raises(BundleError, match="not a bundle folder"):
        Pipeline.load(tmp_path / "nothing-here")


def test_failed_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    from minicpmo.export import bundle as bundle_mod

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the decoder")

    monkeypatch.setattr(bundle_mod, "build_decoder_graph", boom)
    out = tmp_path / "models" / "b"
    with pytest.raises(RuntimeError, match="simulated"):
        bundle_mod.export_bundle(tiny_checkpoint, out, progress=lambda *a: None)
    assert not out.exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_export_refuses_to_overwrite_and_replaces_when_told(tiny_checkpoint, int4_bundle, tmp_path):
    from minicpmo.export.bundle import ExportError, export_bundle
    from minicpmo.export.options import ExportOptions

    out = tmp_path / "b"
    shutil.copytree(int4_bundle, out)
    with pytest.raises(ExportError, match="overwrite"):
        export_bundle(tiny_checkpoint, out, ExportOptions(audio=False), progress=lambda *a: None)
    export_bundle(tiny_checkpoint, out, ExportOptions(audio=False, precision="int8"), overwrite=True,
                  progress=lambda *a: None)
    m = load_manifest(out)
    assert m["options"]["precision"] == "int8" and "audio" not in m.data
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
