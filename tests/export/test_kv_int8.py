"""The int8 KV cache: calibrated at export, a quarter of the bytes, rounding within half a scale step."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from minicpmo.export.kv_calibration import BUILTIN_TEXT, MARGIN, _pair_norm_max
from minicpmo.export.options import ExportOptions
from minicpmo.runtime.pipeline import Pipeline
from minicpmo.runtime.types import GenerationParams


def _layer0_after(pipe: Pipeline, messages) -> tuple[np.ndarray, np.ndarray]:
    """Layer 0's keys and values once the cache holds exactly the prompt (a cold prefill)."""
    pipe.prompt_logits(messages, cache_prompt=False)
    return pipe.kv.layer(0)


def _scales(bundle, layer: int) -> tuple[np.ndarray, np.ndarray]:
    model = onnx.load(bundle / "decoder.onnx", load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    return tuple(numpy_helper.to_array(inits[f"/model/layers.{layer}/attn/{kind}_scale"])[0, :, 0, :]
                 for kind in ("k", "v"))


def test_manifest_graph_and_memory(int4_kv8_bundle, int4_bundle):
    manifest = json.loads((int4_kv8_bundle / "manifest.json").read_text())
    dec = manifest["decoder"]
    assert dec["kv_dtype"] == "int8" and manifest["options"]["kv_cache"] == "int8"
    kv_types = {v["elem_type"] for v in dec["inputs"] + dec["outputs"] if "key" in v["name"] or "value" in v["name"]}
    assert kv_types == {onnx.TensorProto.INT8}
    # the built-in prompts, the image and the clip (this checkpoint has audio), each with a reply
    assert dec["kv_calibration"]["conversations"] == len(BUILTIN_TEXT) + 2
    kv8 = Pipeline.load(int4_kv8_bundle, provider="cpu", context_length=512)
    kv32 = Pipeline.load(int4_bundle, provider="cpu", context_length=512)
    assert kv8.kv.dtype == np.int8 and 4 * kv8.kv.nbytes == kv32.kv.nbytes


def test_cache_rounds_within_half_a_step(int4_kv8_bundle, int4_bundle):
    """Layer 0's keys and values depend only on the prompt and layer 0's weights, which both bundles
    share: the int8 cache times its scales must equal the fp32 cache within half a step, for every
    head, channel and position (a wrong scale layout or a clipped value fails this)."""
    messages = [{"role": "user", "content": BUILTIN_TEXT[0]}]  # calibrated on: nothing saturates
    k8, v8 = _layer0_after(Pipeline.load(int4_kv8_bundle, provider="cpu", context_length=512), messages)
    k32, v32 = _layer0_after(Pipeline.load(int4_bundle, provider="cpu", context_length=512), messages)
    k_scale, v_scale = _scales(int4_kv8_bundle, 0)
    for q, ref, scale in ((k8, k32, k_scale), (v8, v32, v_scale)):
        assert q.dtype == np.int8 and q.shape == ref.shape
        err = np.abs(q.astype(np.float32) * scale[:, None, :] - ref)
        assert (err <= scale[:, None, :] * 0.5 + 1e-6).all(), err.max()
        # the margin leaves headroom (codes stay within 127 / MARGIN), and the scales are not so
        # wide that the codes use only a corner of the range
        assert 127 / MARGIN / 2 <= np.abs(q).max() <= 127 / MARGIN + 1


def test_follow_up_turn_reuses_the_int8_cache(int4_kv8_bundle):
    """A chat turn continues from the earlier turns' int8 cache; its logits match a cold prefill."""
    pipe = Pipeline.load(int4_kv8_bundle, provider="cpu", context_length=1024)
    first = [{"role": "user", "content": "Tell me about rivers."}]
    pipe.kv.reset()
    reply = "".join(c.text for c in pipe.generate(first, GenerationParams(max_tokens=6)))
    follow = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And lakes?"}]
    warm, cached = pipe.prompt_logits(follow)
    cold, none = pipe.prompt_logits(follow, cache_prompt=False)
    assert cached > 0 and none == 0
    assert float(warm @ cold / np.linalg.norm(warm) / np.linalg.norm(cold)) >= 0.99


def test_pair_norm_bound_holds_at_every_rotary_angle():
    """Rotary turns (k_j, k_{j+d/2}) by a position's angle: the bound is the same whatever the angle."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, 50, 8)).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi, (1, 50, 4)).astype(np.float32)
    a, b = keys[..., :4], keys[..., 4:]
    rotated = np.concatenate([a * np.cos(theta) - b * np.sin(theta), a * np.sin(theta) + b * np.cos(theta)], -1)
    np.testing.assert_allclose(_pair_norm_max(keys), _pair_norm_max(rotated), rtol=1e-5)
    assert (np.abs(rotated).max(axis=1) <= _pair_norm_max(keys) + 1e-5).all()


def test_calibration_text_is_added(tmp_path_factory, tiny_checkpoint, tmp_path):
    from minicpmo.export.bundle import ExportError, export_bundle

    text = tmp_path / "calibration.txt"
    text.write_text("First paragraph about the weather.\n\nSecond one, about trains and stations.\n")
    out = tmp_path_factory.mktemp("kv8") / "with-text"
    export_bundle(tiny_checkpoint, out, ExportOptions(kv_cache="int8", audio=False, kv_calibration_text=str(text)),
                  progress=lambda *a: None)
    summary = json.loads((out / "manifest.json").read_text())["decoder"]["kv_calibration"]
    assert summary["conversations"] == len(BUILTIN_TEXT) + 1 + 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    bad = tmp_path_factory.mktemp("kv8") / "empty-text"
    with pytest.raises(ExportError, match="no text to calibrate on"):
        export_bundle(tiny_checkpoint, bad, ExportOptions(kv_cache="int8", kv_calibration_text=str(empty)),
                      progress=lambda *a: None)
    assert not bad.exists() or not any(bad.iterdir())
    long = tmp_path / "long.txt"
    long.write_text("word " * 5000)
    with pytest.raises(ExportError, match=r"calibration prompt \d+ of \d+: .*context"):
        export_bundle(tiny_checkpoint, bad, ExportOptions(kv_cache="int8", kv_calibration_text=str(long)),
                      progress=lambda *a: None)
    assert not bad.exists() or not any(bad.iterdir())


def test_a_long_calibration_file_is_sampled_evenly(tmp_path):
    from minicpmo.export.kv_calibration import MAX_CALIBRATION_PARAGRAPHS, calibration_conversations

    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(f"Paragraph {i} of the book." for i in range(1000)))
    convs = calibration_conversations(text, audio=False)
    taken = [c[0]["content"] for c in convs[len(BUILTIN_TEXT) + 1:]]
    assert len(taken) == MAX_CALIBRATION_PARAGRAPHS
    assert taken[0] == "Paragraph 0 of the book." and taken[-1] == "Paragraph 999 of the book."
    assert len(set(taken)) == len(taken)


@pytest.mark.parametrize("kw, message", [
    ({"kv_cache": "int8", "decoder_dtype": "fp16"}, "fp32 decoder"),
    ({"kv_cache": "int4"}, "kv cache must be one of"),
    ({"kv_calibration_text": "x.txt"}, "only used with an int8 KV cache"),
])
def test_bad_options(kw, message):
    with pytest.raises(ValueError, match=message):
        ExportOptions(**kw)
