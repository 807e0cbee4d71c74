"""The importance calibration (export/imatrix.py) and the importance-weighted quantizer."""

from __future__ import annotations

import numpy as np
import pytest

from minicpmo.export.quant import dequantize_weight, quantize_weight


def test_calibration_forward_matches_the_reference(tiny_checkpoint):
    """The numpy layer-by-layer forward gives the reference decoder's final hidden states, so the
    importance it reports is that of the real activations."""
    torch = pytest.importorskip("torch")
    from minicpmo.export.checkpoint import open_checkpoint
    from minicpmo.export.imatrix import LayerCalibration, _rms_norm
    from minicpmo.export.reference import load_weights
    from minicpmo.export.reference.decoder import decoder_hidden, embed

    ckpt = open_checkpoint(tiny_checkpoint)
    cfg = ckpt.config.decoder
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 40)
    calib = LayerCalibration(cfg, ckpt.read, [ids[:25], ids])
    for i in range(cfg.num_hidden_layers):
        imp = calib.advance(i)
        assert set(imp) == {"attn/qkv_proj", "attn/o_proj", "mlp/gate_up_proj", "mlp/down_proj"}
        assert imp["mlp/down_proj"].shape == (cfg.intermediate_size,) and (imp["attn/o_proj"] > 0).all()
    ours = _rms_norm(calib.streams[1], ckpt.read("llm.model.norm.weight"), cfg.rms_norm_eps)
    weights = load_weights(tiny_checkpoint, prefixes=("llm.",))
    with torch.no_grad():
        ref = decoder_hidden(weights, ckpt.config, embed(weights, torch.tensor(ids)))[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)
    head = calib.head_importance()
    first = _rms_norm(calib.streams[0], ckpt.read("llm.model.norm.weight"), cfg.rms_norm_eps)
    np.testing.assert_allclose(head, (np.square(first).sum(0) + np.square(ours).sum(0)) / 65, rtol=1e-4)


def test_importance_lowers_the_weighted_error():
    """Channels with large activations get the smaller errors: the error that reaches the layer's
    output (x @ dW.T on inputs with those magnitudes) drops against the unweighted search."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((256, 512)).astype(np.float32)
    imp = np.exp(rng.standard_normal(512) * 1.5).astype(np.float32)  # a few channels dominate
    x = rng.standard_normal((64, 512)).astype(np.float32) * np.sqrt(imp)
    errors = {}
    for name, importance in (("plain", None), ("weighted", imp)):
        dw = dequantize_weight(quantize_weight(w, 4, 128, importance=importance)) - w
        errors[name] = float(np.linalg.norm(x @ dw.T))
    assert errors["weighted"] < 0.95 * errors["plain"], errors


def test_uniform_importance_never_does_worse():
    """Equal importance is the plain squared-error search, round-to-nearest's range among its candidates:
    no block's error grows over round-to-nearest's, and the sum falls."""
    w = np.random.default_rng(4).standard_normal((64, 384)).astype(np.float32)
    plain = dequantize_weight(quantize_weight(w, 4, 128, clip_ratios=(1.0,))) - w
    uniform = dequantize_weight(quantize_weight(w, 4, 128, importance=np.ones(384, np.float32))) - w
    per_block = lambda d: np.square(d).reshape(64, 3, 128).sum(-1)  # noqa: E731
    assert (per_block(uniform) <= per_block(plain) + 1e-6).all()
    assert per_block(uniform).sum() < per_block(plain).sum()
