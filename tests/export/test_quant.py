"""Block quantization into MatMulNBits layout: what ONNX Runtime computes is x @ dequantize(W).T."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from minicpmo.export.graph import MS_DOMAIN, GraphBuilder
from minicpmo.export.quant import dequantize_weight, quantize_weight, relative_error


@pytest.mark.parametrize("bits, block, bound", [(4, 32, 0.09), (4, 128, 0.11), (4, 256, 0.12), (8, 32, 0.006),
                                               (8, 64, 0.007)])
def test_reconstruction_error_is_bounded(bits, block, bound):
    w = np.random.default_rng(0).standard_normal((64, 320)).astype(np.float32)
    q = quantize_weight(w, bits, block)
    err = relative_error(w, q)
    assert 0 < err < bound
    assert dequantize_weight(q).shape == w.shape


def test_chunked_rows_give_identical_bytes():
    w = np.random.default_rng(1).standard_normal((1000, 96)).astype(np.float32)
    for bits in (4, 8):
        a, b = quantize_weight(w, bits, 32), quantize_weight(w, bits, 32, rows_per_chunk=77)
        for field in ("packed", "scales", "zero_points"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_computes_with_the_dequantized_weight(tmp_path, bits):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    bias = rng.standard_normal(48).astype(np.float32)
    q = quantize_weight(w, bits, 32)
    g = GraphBuilder("t", tmp_path / "m.onnx.data")
    g.input("x", TensorProto.FLOAT, ["b", 256])
    ins = ["x", g.initializer("w", q.packed), g.initializer("s", q.scales), g.initializer("z", q.zero_points),
           "", g.initializer("bias", bias)]
    g.node("MatMulNBits", ins, "mm", domain=MS_DOMAIN, outputs=["y"], K=256, N=48, bits=bits, block_size=32,
           accuracy_level=0)
    g.output("y", TensorProto.FLOAT, ["b", 48])
    g.save(tmp_path / "m.onnx")
    x = rng.standard_normal((3, 256)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ dequantize_weight(q).T + bias, rtol=1e-5, atol=1e-4)


def test_bad_arguments():
    w = np.zeros((4, 64), np.float32)
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(w, 3, 32)
    with pytest.raises(ValueError, match="block_size"):
        quantize_weight(w, 4, 48)
