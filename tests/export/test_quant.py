"""Block quantization into MatMulNBits layout: what ONNX Runtime computes is x @ dequantize(W).T."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnxruntime.capi import _pybind_state as ort_c

from minicpmo.export.graph import MS_DOMAIN, GraphBuilder
from minicpmo.export.quant import dequantize_weight, quantize_weight, relative_error


@pytest.mark.parametrize("bits, block, bound", [(4, 32, 0.09), (4, 128, 0.11), (4, 256, 0.12), (8, 32, 0.006),
                                               (8, 64, 0.007), (2, 64, 0.37), (2, 128, 0.40)])
def test_reconstruction_error_is_bounded(bits, block, bound):
    w = np.random.default_rng(0).standard_normal((64, 320)).astype(np.float32)
    q = quantize_weight(w, bits, block)
    err = relative_error(w, q)
    assert 0 < err < bound
    assert dequantize_weight(q).shape == w.shape


def test_chunked_rows_give_identical_bytes():
    w = np.random.default_rng(1).standard_normal((1000, 96)).astype(np.float32)
    for bits in (2, 4, 8):
        a, b = quantize_weight(w, bits, 32), quantize_weight(w, bits, 32, rows_per_chunk=77)
        for field in ("packed", "scales", "zero_points"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


# (K, block): whole blocks; a partial last block (K = 200) and an odd count of blocks (the zero points'
# last byte half used), at fp32 activations and at int8 activations (accuracy level 4, the CPU default)
# 2 bits: four codes per byte, and zero points over 5 blocks fill one byte and a quarter of the next
@pytest.mark.parametrize("bits, k, block, level", [(4, 256, 32, 0), (8, 256, 32, 0), (4, 200, 64, 0), (4, 160, 32, 0),
                                                   (4, 200, 64, 4), (4, 384, 128, 4), (8, 200, 64, 4),
                                                   (2, 256, 64, 0), (2, 320, 64, 0), (2, 200, 128, 0),
                                                   (2, 384, 128, 4), (2, 576, 128, 4)])
def test_matmulnbits_computes_with_the_dequantized_weight(tmp_path, bits, k, block, level):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((48, k)).astype(np.float32)
    bias = rng.standard_normal(48).astype(np.float32)
    q = quantize_weight(w, bits, block)
    g = GraphBuilder("t", tmp_path / "m.onnx.data")
    g.input("x", TensorProto.FLOAT, ["b", k])
    ins = ["x", g.initializer("w", q.packed), g.initializer("s", q.scales), g.initializer("z", q.zero_points),
           "", g.initializer("bias", bias)]
    g.node("MatMulNBits", ins, "mm", domain=MS_DOMAIN, outputs=["y"], K=k, N=48, bits=bits, block_size=block,
           accuracy_level=level)
    g.output("y", TensorProto.FLOAT, ["b", 48])
    g.save(tmp_path / "m.onnx")
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = x @ dequantize_weight(q).T + bias
    if level == 0:
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)
    else:  # the activations are rounded to int8 per block: ~1% of a dot product's scale
        assert np.abs(y - expected).max() < 0.02 * np.abs(expected).max()


@pytest.mark.parametrize("bits", [4, 2])
def test_round_to_nearest_is_onnxruntimes_own(bits):
    """With the range search off, the 4-bit (2-bit) packing reproduces ONNX Runtime's quantizer: the
    conventions dequantize_weight and MatMulNBits read are the same. 5 blocks: the zero points' last
    byte is partly unused (ORT pads it with its default zero point, we with 0)."""
    w = np.random.default_rng(3).standard_normal((40, 320)).astype(np.float32)
    ours = quantize_weight(w, bits, 64, clip_ratios=(1.0,))
    per_byte = 8 // bits
    zp_cols = -(-5 // per_byte)
    packed = np.zeros((40, 5, 64 // per_byte), np.uint8)
    scales = np.zeros((40, 5), np.float32)
    zps = np.zeros((40, zp_cols), np.uint8)
    quantize = ort_c.quantize_matmul_4bits if bits == 4 else ort_c.quantize_matmul_2bits
    quantize(packed, np.ascontiguousarray(w.T), scales, zps, 64, 40, 320, False)
    np.testing.assert_array_equal(ours.packed, packed)
    np.testing.assert_allclose(ours.scales, scales.reshape(-1), rtol=1e-6)
    ours_zp = ours.zero_points.reshape(40, zp_cols)
    np.testing.assert_array_equal(ours_zp[:, :-1], zps[:, :-1])  # the whole bytes
    used = (1 << bits * (5 % per_byte)) - 1  # the last byte's low bits: block 4's zero point
    np.testing.assert_array_equal(ours_zp[:, -1] & used, zps[:, -1] & used)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dist", ["normal", "t4"])
def test_range_search_lowers_the_weighted_error(dist, bits):
    """The search minimises each block's error weighted by rms(block) + |w|: round-to-nearest's range is
    among its candidates, so no block gets worse by that measure, and on heavy or light tails it helps."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((256, 1024)) if dist == "normal" else rng.standard_t(4, (256, 1024))).astype(np.float32)
    plain = quantize_weight(w, bits, 128, clip_ratios=(1.0,))
    searched = quantize_weight(w, bits, 128)
    blocks = w.reshape(256, 8, 128)
    weight = np.sqrt(np.mean(np.square(blocks), -1, keepdims=True)) + np.abs(blocks)
    err = [(weight * np.square(dequantize_weight(q).reshape(256, 8, 128) - blocks)).sum(-1) for q in (plain, searched)]
    assert (err[1] <= err[0] * (1 + 1e-5)).all()
    assert err[1].sum() < (0.97 if bits == 4 else 0.9) * err[0].sum()


def test_range_search_keeps_the_large_weights():
    """One large weight per block (a trained layer's outlier): the plain-error search would clip it; the
    weighted search keeps it within one quantization step of its value."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    w[:, ::128] = 12.0
    q = quantize_weight(w, 4, 128)
    step = q.scales.reshape(64, 2)
    got = dequantize_weight(q)[:, ::128]
    assert (np.abs(got - 12.0) <= step).all()


def test_bad_arguments():
    w = np.zeros((4, 64), np.float32)
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(w, 3, 32)
    with pytest.raises(ValueError, match="block_size"):
        quantize_weight(w, 4, 48)
