"""Vocos graph (upstream `Vocos.decode`: VocosBackbone + ISTFTHead): mel -> 24 kHz waveform.

Input `mel` f32 [1, 100, F], output `waveform` f32 [1, F * hop].

The inverse STFT is inside the graph and exact: ONNX's DFT has no one-sided inverse, but an inverse
real DFT of n_fft points is a fixed linear map, so the windowed frames are one MatMul of
[Re | Im] with a basis that holds irfft's weights (1 for DC and Nyquist, 2 for the other bins, / n_fft)
times the Hann window. Overlap-add with hop = n_fft / 4 is four shifted slices summed (Pad + Add),
the window envelope likewise; Vocos's "same" padding then cuts (n_fft - hop) / 2 from both ends
and divides by the envelope:

    mel ─ Conv k7 ─ LayerNorm ─ ConvNeXt x n ─ LayerNorm ─ Linear(dim → n_fft + 2) ─ split
      ─ mag = min(exp(·), 100), phase ─ [mag·cos | mag·sin] ─ MatMul(basis) ─ frames [F, n_fft]
      ─ overlap-add ─ cut ─ ÷ envelope ─ waveform
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from onnx import TensorProto

from .conv_ops import channels_last, conv1d, convnext_block, dense
from .graph import GraphBuilder
from .ops import layer_norm

INPUT, OUTPUT = "mel", "waveform"
MAX_MAGNITUDE = 100.0  # ISTFTHead's clip: a safeguard against huge magnitudes


def irfft_basis(window: np.ndarray) -> np.ndarray:
    """[n_fft + 2, n_fft]: [Re X | Im X] @ basis = irfft(X, n_fft) · window, per frame."""
    n = window.shape[0]
    k = np.arange(n // 2 + 1)[:, None]
    t = np.arange(n)[None, :]
    weight = np.where((k == 0) | (k == n // 2), 1.0, 2.0) / n
    angle = 2 * np.pi * k * t / n
    basis = np.concatenate([weight * np.cos(angle), -weight * np.sin(angle)]) * window[None, :].astype(np.float64)
    return basis.astype(np.float32)


def _backbone(g: GraphBuilder, state: Mapping[str, np.ndarray], layers: int) -> str:
    x = conv1d(g, "/vocos/embed", INPUT, state["backbone.embed.weight"], state["backbone.embed.bias"], padding=3)
    x = layer_norm(g, "/vocos/norm", channels_last(g, "/vocos/norm/in", x), state["backbone.norm.weight"],
                   state["backbone.norm.bias"], 1e-6)
    x = channels_last(g, "/vocos/norm/out", x)
    for i in range(layers):
        x = convnext_block(g, f"/vocos/convnext.{i}", x, state.__getitem__, f"backbone.convnext.{i}",
                           dilation=1, scale="gamma")
    return layer_norm(g, "/vocos/final_layer_norm", channels_last(g, "/vocos/final_layer_norm/in", x),
                      state["backbone.final_layer_norm.weight"], state["backbone.final_layer_norm.bias"], 1e-6)


def _overlap_add(g: GraphBuilder, name: str, frames: str, n_fft: int, hop: int) -> str:
    """frames [F, n_fft] -> [(F - 1) * hop + n_fft]: frame f lands at f * hop."""
    parts = n_fft // hop
    split = g.op("Reshape", [frames, g.const([0, parts, hop])], f"{name}/Reshape")  # [F, parts, hop]
    total = None
    for i in range(parts):
        # (Slice, not Gather: the graph builder stores a 0-d constant as [1], which Gather would keep)
        piece = g.op("Slice", [split, g.const([i]), g.const([i + 1]), g.const([1])], f"{name}/part.{i}/Slice")
        piece = g.op("Squeeze", [piece, g.const([1])], f"{name}/part.{i}/Squeeze")  # [F, hop]
        piece = g.op("Pad", [piece, g.const([i, 0, parts - 1 - i, 0])], f"{name}/part.{i}/Pad")
        total = piece if total is None else g.op("Add", [total, piece], f"{name}/part.{i}/Add")
    return g.op("Reshape", [total, g.const([-1])], f"{name}/flat")


def build_vocos_graph(g: GraphBuilder, state: Mapping[str, np.ndarray], layers: int, hop: int = 256) -> None:
    """Add Vocos (backbone + ISTFT head + inverse STFT) to `g` from its state dict (fp32)."""
    window = state["head.istft.window"].astype(np.float32)
    n_fft = window.shape[0]
    if n_fft % hop or n_fft // hop < 2:
        raise ValueError(f"Vocos: n_fft {n_fft} must be a multiple (at least 2x) of hop {hop}")
    mels = state["backbone.embed.weight"].shape[1]
    g.input(INPUT, TensorProto.FLOAT, [1, mels, "mel_frames"])
    g.output(OUTPUT, TensorProto.FLOAT, [1, "samples"])
    x = _backbone(g, state, layers)  # [1, F, dim]
    out = dense(g, "/vocos/head/out", x, state["head.out.weight"], state["head.out.bias"])  # [1, F, n_fft + 2]
    log_mag, phase = g.node("Split", [out], "/vocos/head/Split", n_out=2, axis=-1, num_outputs=2)
    mag = g.op("Exp", [log_mag], "/vocos/head/Exp")
    mag = g.op("Min", [mag, g.const(np.float32(MAX_MAGNITUDE), np.float32)], "/vocos/head/clip")
    re = g.op("Mul", [mag, g.op("Cos", [phase], "/vocos/head/Cos")], "/vocos/head/real")
    im = g.op("Mul", [mag, g.op("Sin", [phase], "/vocos/head/Sin")], "/vocos/head/imag")
    spec = g.op("Concat", [re, im], "/vocos/istft/Concat", axis=-1)
    frames = g.op("MatMul", [spec, g.initializer("/vocos/istft/basis", irfft_basis(window))], "/vocos/istft/irfft")
    frames = g.op("Squeeze", [frames, g.const([0])], "/vocos/istft/Squeeze")  # [F, n_fft]
    signal = _overlap_add(g, "/vocos/istft/overlap_add", frames, n_fft, hop)
    # the envelope: the squared window, overlap-added over as many frames
    ones = g.op("Shape", [frames], "/vocos/istft/envelope/Shape")
    sq = g.op("Expand", [g.initializer("/vocos/istft/window_sq", np.square(window)[None, :]), ones],
              "/vocos/istft/envelope/Expand")
    envelope = _overlap_add(g, "/vocos/istft/envelope", sq, n_fft, hop)
    cut = (n_fft - hop) // 2
    signal, envelope = (g.op("Slice", [t, g.const([cut]), g.const([-cut]), g.const([0])], f"/vocos/istft/cut.{i}")
                        for i, t in enumerate((signal, envelope)))
    wave = g.op("Div", [signal, envelope], "/vocos/istft/normalize")
    g.op("Unsqueeze", [wave, g.const([0])], "/vocos/waveform/Unsqueeze", outputs=[OUTPUT])
