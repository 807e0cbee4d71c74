"""ChatTTS's DVAE decoder graph (upstream `DVAE.forward(mode="decode")`): audio codes -> mel.

Input `codes` int64 [1, 4, T] (each < 625), output `mel` f32 [1, 100, 2T].

The GFSQ dequantizer (vector_quantize_pytorch's GroupedResidualFSQ, 2 groups x 2 residual levels of
FSQ(5,5,5,5)) is folded into four lookup tables: stream q (group q // 2, residual r = q % 2) maps
code c to FSQ(c) · 4^-r @ project_outᵀ, since project_out is linear in the summed residuals. Then
the groups are interleaved in time (frame 2t + g = group g at t), as upstream's view/permute does:

    codes ─ Split ─ Gather(table_q) ─ Σ pairs + bias ─ stack ─ [1, 2T, D] ─ Transpose
      ─ Conv k3 ─ Gelu ─ Conv k3 ─ ConvNeXt(dilation 2) x n ─ Conv 1x1 ─ out_conv k3 ─ ·coef ─ mel
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from onnx import TensorProto

from .conv_ops import channels_last, conv1d, convnext_block, gelu
from .graph import GraphBuilder

ReadWeight = Callable[[str], np.ndarray]
INPUT, OUTPUT = "codes", "mel"
FSQ_LEVELS = (5, 5, 5, 5)
P = "tts.dvae."


def fsq_codebook(levels=FSQ_LEVELS) -> np.ndarray:
    """FSQ index -> its values in [-1, 1]: [prod(levels), len(levels)] (mixed radix, first level fastest)."""
    idx = np.arange(math.prod(levels))
    basis = np.cumprod((1, *levels[:-1]))
    half = np.array([lv // 2 for lv in levels], dtype=np.float64)
    return ((idx[:, None] // basis) % np.array(levels) - half) / half


def dequantize_tables(read: ReadWeight) -> list[np.ndarray]:
    """Per code stream q: [625, D] rows FSQ(c) · (levels - 1)^-r @ project_out_gᵀ (g = q // 2, r = q % 2)."""
    book = fsq_codebook()
    tables = []
    for q in range(4):
        group, residual = divmod(q, 2)
        w = read(f"{P}vq_layer.quantizer.rvqs.{group}.project_out.weight").astype(np.float64)
        tables.append((book * (FSQ_LEVELS[0] - 1) ** -residual @ w.T).astype(np.float32))
    return tables


def _dequantize(g: GraphBuilder, read: ReadWeight) -> str:
    streams = g.node("Split", [INPUT], "/dvae/codes/Split", n_out=4, axis=1, num_outputs=4)
    rows = []
    for q, table in enumerate(dequantize_tables(read)):
        idx = g.op("Squeeze", [streams[q], g.const([1])], f"/dvae/vq/stream.{q}/Squeeze")  # [1, T]
        rows.append(g.op("Gather", [g.initializer(f"/dvae/vq/stream.{q}/table", table), idx],
                         f"/dvae/vq/stream.{q}/Gather", axis=0))  # [1, T, D]
    groups = []
    for group in range(2):
        bias = read(f"{P}vq_layer.quantizer.rvqs.{group}.project_out.bias").astype(np.float32)
        s = g.op("Add", [rows[2 * group], rows[2 * group + 1]], f"/dvae/vq/group.{group}/Add")
        s = g.op("Add", [s, g.initializer(f"/dvae/vq/group.{group}/bias", bias)], f"/dvae/vq/group.{group}/Bias")
        groups.append(g.op("Unsqueeze", [s, g.const([2])], f"/dvae/vq/group.{group}/Unsqueeze"))  # [1, T, 1, D]
    both = g.op("Concat", groups, "/dvae/vq/Concat", axis=2)  # [1, T, 2, D]
    width = read(f"{P}vq_layer.quantizer.rvqs.0.project_out.weight").shape[0]
    frames = g.op("Reshape", [both, g.const([1, -1, width])], "/dvae/vq/interleave")  # [1, 2T, D]
    return channels_last(g, "/dvae/vq/to_channels_first", frames)


def build_dvae_graph(g: GraphBuilder, read: ReadWeight, layers: int) -> None:
    """Add the DVAE decoder with `layers` ConvNeXt blocks to `g` (fp32)."""
    g.input(INPUT, TensorProto.INT64, [1, 4, "code_frames"])
    mels = read(f"{P}coef").shape[1]
    g.output(OUTPUT, TensorProto.FLOAT, [1, mels, "mel_frames"])
    x = _dequantize(g, read)
    d = f"{P}decoder."
    x = conv1d(g, "/dvae/decoder/conv_in.0", x, read(d + "conv_in.0.weight"), read(d + "conv_in.0.bias"), padding=1)
    x = gelu(g, "/dvae/decoder/conv_in.1", x)
    x = conv1d(g, "/dvae/decoder/conv_in.2", x, read(d + "conv_in.2.weight"), read(d + "conv_in.2.bias"), padding=1)
    for j in range(layers):
        x = convnext_block(g, f"/dvae/decoder/decoder_block.{j}", x, read, f"{d}decoder_block.{j}",
                           dilation=2, scale="coef")
    x = conv1d(g, "/dvae/decoder/conv_out", x, read(d + "conv_out.weight"), None, padding=0)
    x = conv1d(g, "/dvae/out_conv", x, read(f"{P}out_conv.weight"), None, padding=1)
    g.op("Mul", [x, g.initializer("/dvae/coef", read(f"{P}coef").astype(np.float32))], "/dvae/coef/Mul",
         outputs=[OUTPUT])
