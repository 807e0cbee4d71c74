"""1-D convolution patterns of the speech decoders (DVAE decoder, Vocos), fp32, on [1, C, T] tensors."""

from __future__ import annotations

import numpy as np

from .graph import GraphBuilder
from .ops import layer_norm


def conv1d(g: GraphBuilder, name: str, x: str, weight: np.ndarray, bias: np.ndarray | None, *,
           padding: int, dilation: int = 1, groups: int = 1) -> str:
    """nn.Conv1d (stride 1, symmetric zero padding) on [1, C_in, T]."""
    inputs = [x, g.initializer(f"{name}/weight", weight.astype(np.float32))]
    if bias is not None:
        inputs.append(g.initializer(f"{name}/bias", bias.astype(np.float32)))
    return g.op("Conv", inputs, f"{name}/Conv", kernel_shape=[weight.shape[-1]], pads=[padding, padding],
                dilations=[dilation], group=groups)


def gelu(g: GraphBuilder, name: str, x: str) -> str:
    """nn.GELU() (exact, erf)."""
    return g.op("Gelu", [x], f"{name}/Gelu", approximate="none")


def dense(g: GraphBuilder, name: str, x: str, weight: np.ndarray, bias: np.ndarray) -> str:
    """nn.Linear on the last axis, fp32."""
    y = g.op("MatMul", [x, g.initializer(f"{name}/weight", np.ascontiguousarray(weight.T).astype(np.float32))],
             f"{name}/MatMul")
    return g.op("Add", [y, g.initializer(f"{name}/bias", bias.astype(np.float32))], f"{name}/Add")


def channels_last(g: GraphBuilder, name: str, x: str) -> str:
    """[1, C, T] <-> [1, T, C]"""
    return g.op("Transpose", [x], f"{name}/Transpose", perm=[0, 2, 1])


def convnext_block(g: GraphBuilder, name: str, x: str, read, prefix: str, *, dilation: int, scale: str) -> str:
    """The ConvNeXt block of Vocos and of ChatTTS's DVAE on [1, C, T] (`scale`: the layer-scale
    tensor's name, "gamma" in Vocos, "coef" in the DVAE):

        x ─ Conv(depthwise, k7, dilation) ─ Transpose ─ LayerNorm ─ Linear ─ Gelu ─ Linear ─ ·scale ─ Transpose ─ + ─►
        └──────────────────────────────────────────────────────────────────────────────────────────────────────┘
    """
    dw = read(f"{prefix}.dwconv.weight")
    y = conv1d(g, f"{name}/dwconv", x, dw, read(f"{prefix}.dwconv.bias"), padding=3 * dilation,
               dilation=dilation, groups=dw.shape[0])
    y = channels_last(g, f"{name}/to_channels_last", y)
    y = layer_norm(g, f"{name}/norm", y, read(f"{prefix}.norm.weight"), read(f"{prefix}.norm.bias"), 1e-6)
    y = gelu(g, f"{name}/act", dense(g, f"{name}/pwconv1", y, read(f"{prefix}.pwconv1.weight"),
                                     read(f"{prefix}.pwconv1.bias")))
    y = dense(g, f"{name}/pwconv2", y, read(f"{prefix}.pwconv2.weight"), read(f"{prefix}.pwconv2.bias"))
    y = g.op("Mul", [y, g.initializer(f"{name}/{scale}", read(f"{prefix}.{scale}").astype(np.float32))],
             f"{name}/LayerScale")
    y = channels_last(g, f"{name}/to_channels_first", y)
    return g.op("Add", [x, y], f"{name}/Residual")
