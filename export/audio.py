"""Audio graph: Whisper encoder (upstream MiniCPMWhisperEncoder) + audio projection + average pooling.

Inputs (made by the runtime's numpy preprocessing, runtime/preprocess/audio.py):
  input_features  [b, 80, F] f32  log-mel frames of one piece (F <= 3000, i.e. <= 30 s), zero padded
  feature_lens    [b] i64         mel frames per row (upstream audio_feature_lens)
Output:
  audio_embeds    [b, C//p, D] f32  C = (F-1)//2+1 encoder frames, p = audio_pool_step; the runtime keeps
                                  the first (C_i - p)//p + 1 rows of each piece

The attention bias is built in the graph from the frame count and feature_lens, as upstream
get_audio_embedding builds it: key j is hidden from query i when j >= (i//k + 1)*k (k = 50 frames per
audio_chunk_length second: full left context, no look-ahead past the chunk) or when
j >= feature_lens (upstream compares the post-conv index with the MEL frame count; kept as is).

    features ─ Conv1d(k3,p1) ─ gelu ─ Conv1d(k3,s2,p1) ─ gelu ─ + embed_positions[:C]
      └─ N × [LN ─ MHA(chunk bias) ─ + ─ LN ─ fc1 ─ gelu ─ fc2 ─ +] ─ layer_norm
      └─ linear1 ─ ReLU ─ AvgPool(p) ─ linear2      (pooling moved before linear2: both are linear)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnx import TensorProto

from .graph import GraphBuilder
from .hf_config import ConfigError, MiniCPMOConfig
from .ops import ErrorSink, layer_norm, linear, merge_heads, sdpa, split_heads

ReadWeight = Callable[[str], np.ndarray]
INPUTS = ("input_features", "feature_lens")
OUTPUT = "audio_embeds"
FRAMES_PER_CHUNK_SECOND = 50  # encoder frames per second (100 mel frames / conv stride 2)
LN_EPS = 1e-5  # WhisperEncoder uses nn.LayerNorm defaults


def chunk_frames(cfg: MiniCPMOConfig) -> int:
    """Encoder frames per attention chunk (upstream int(audio_chunk_length * 50)); 0 = full attention."""
    return max(int(cfg.audio_chunk_length * FRAMES_PER_CHUNK_SECOND), 0)


def _check(cfg: MiniCPMOConfig) -> None:
    if cfg.audio is None:
        raise ConfigError("config.json: no audio_config, so there is no audio encoder to export")
    act = (cfg.raw.get("audio_config") or {}).get("activation_function", "gelu")
    if act != "gelu":
        raise ConfigError(f"config.json audio_config: activation_function {act!r} is not supported (only 'gelu')")
    if cfg.audio.d_model % cfg.audio.encoder_attention_heads:
        raise ConfigError("config.json audio_config: d_model must be divisible by encoder_attention_heads")


def _conv(g: GraphBuilder, name: str, x: str, read: ReadWeight, key: str, stride: int, prec: str) -> str:
    """Conv1d(k=3, pad=1) + exact gelu; fp16 stores the kernel in half precision, else fp32."""
    w = read(key + ".weight")
    dtype = np.float16 if prec == "fp16" else np.float32
    wt = g.initializer(f"{name}/weight", w.astype(dtype))
    if dtype == np.float16:
        wt = g.op("Cast", [wt], f"{name}/weight/Cast", to=TensorProto.FLOAT)
    b = g.initializer(f"{name}/bias", read(key + ".bias").astype(np.float32))
    y = g.op("Conv", [x, wt, b], f"{name}/Conv", kernel_shape=[3], pads=[1, 1], strides=[stride])
    return g.op("Gelu", [y], f"{name}/Gelu", approximate="none")


def _stem(g: GraphBuilder, read: ReadWeight, prec: str) -> tuple[str, str]:
    """[b, 80, F] -> ([b, C, d] conv features + positions, C as a 1-D int64 tensor [1])."""
    x = _conv(g, "/audio/conv1", "input_features", read, "apm.conv1", 1, prec)
    x = _conv(g, "/audio/conv2", x, read, "apm.conv2", 2, prec)
    x = g.op("Transpose", [x], "/audio/conv2/Transpose", perm=[0, 2, 1])  # [b, C, d]
    shape = g.op("Shape", [x], "/audio/frames/Shape")
    frames = g.op("Slice", [shape, g.const([1]), g.const([2]), g.const([0])], "/audio/frames/Slice")  # [1]
    table = g.initializer("/audio/embed_positions/weight", read("apm.embed_positions.weight").astype(np.float32))
    pos = g.op("Slice", [table, g.const([0]), frames, g.const([0])], "/audio/embed_positions/Slice")
    return g.op("Add", [x, pos], "/audio/embed_positions/Add"), frames


def _attention_bias(g: GraphBuilder, frames: str, chunk: int) -> str:
    """Additive bias [b, 1, C, C]: 0 where query i may see key j, finfo.min elsewhere (see module doc)."""
    n = "/audio/attn_bias"
    count = g.op("Squeeze", [frames, g.const([0])], f"{n}/C")
    pos = g.op("Range", [g.const(0), count, g.const(1)], f"{n}/Range")  # [C]
    keys = g.op("Unsqueeze", [pos, g.const([0, 1])], f"{n}/keys")  # [1, 1, C]
    lens = g.op("Unsqueeze", ["feature_lens", g.const([1, 2])], f"{n}/lens")  # [b, 1, 1]
    visible = g.op("Less", [keys, lens], f"{n}/padding/Less")  # [b, 1, C]
    if chunk > 0:
        ends = g.op("Mul", [g.op("Add", [g.op("Div", [pos, g.const(chunk)], f"{n}/chunk/Div"), g.const(1)],
                                 f"{n}/chunk/Add"), g.const(chunk)], f"{n}/chunk/end")  # [C] per query
        ends = g.op("Unsqueeze", [ends, g.const([1])], f"{n}/chunk/Unsqueeze")  # [C, 1]
        in_chunk = g.op("Less", [keys, ends], f"{n}/chunk/Less")  # [1, C, C]
        visible = g.op("And", [visible, in_chunk], f"{n}/And")  # [b, C, C]
    neg = g.const(np.float32(np.finfo(np.float32).min), np.float32)
    bias = g.op("Where", [visible, g.const(np.float32(0.0), np.float32), neg], f"{n}/Where")
    return g.op("Unsqueeze", [bias, g.const([1])], f"{n}/Unsqueeze")


def _encoder_layer(g: GraphBuilder, i: int, x: str, bias: str, cfg: MiniCPMOConfig, read: ReadWeight,
                   lin) -> str:
    a = cfg.audio
    heads, hd = a.encoder_attention_heads, a.d_model // a.encoder_attention_heads
    pre, name = f"apm.layers.{i}.", f"/audio/layers.{i}"

    def ln(norm: str, t: str) -> str:
        return layer_norm(g, f"{name}/{norm}", t, read(pre + norm + ".weight"), read(pre + norm + ".bias"), LN_EPS)

    h = ln("self_attn_layer_norm", x)
    qkv = [split_heads(g, f"{name}/attn/{t}", lin(f"{name}/attn/{t}_proj", h, pre + f"self_attn.{t}_proj",
                                                  bias=t != "k"), heads, hd) for t in ("q", "k", "v")]
    attn = merge_heads(g, f"{name}/attn/merge", sdpa(g, f"{name}/attn", *qkv, bias, hd ** -0.5), a.d_model)
    x = g.op("Add", [x, lin(f"{name}/attn/out_proj", attn, pre + "self_attn.out_proj")], f"{name}/attn/residual")
    h = lin(f"{name}/mlp/fc1", ln("final_layer_norm", x), pre + "fc1")
    h = g.op("Gelu", [h], f"{name}/mlp/Gelu", approximate="none")
    return g.op("Add", [x, lin(f"{name}/mlp/fc2", h, pre + "fc2")], f"{name}/mlp/residual")


def _project_and_pool(g: GraphBuilder, x: str, frames: str, step: int, width: int, lin) -> str:
    """linear1 -> ReLU -> AvgPool1d(step, step) over time -> linear2: [b, C, d] -> [b, C//step, D=width]."""
    h = g.op("Relu", [lin("/audio/projection/linear1", x, "audio_projection_layer.linear1")],
             "/audio/projection/Relu")
    n = "/audio/pool"
    kept = g.op("Mul", [g.op("Div", [frames, g.const([step])], f"{n}/Div"), g.const([step])], f"{n}/kept")
    h = g.op("Slice", [h, g.const([0]), kept, g.const([1])], f"{n}/Slice")  # drop the odd last frame
    h = g.op("Reshape", [h, g.const([0, -1, step, width])], f"{n}/Reshape")  # [b, C//step, step, D]
    h = g.op("ReduceMean", [h, g.const([2])], f"{n}/ReduceMean", keepdims=0)
    return lin("/audio/projection/linear2", h, "audio_projection_layer.linear2")


def build_audio_graph(g: GraphBuilder, cfg: MiniCPMOConfig, read: ReadWeight, precision: str,
                      block_size: int = 32, accuracy_level: int = 4, on_error: ErrorSink | None = None) -> None:
    """Add the audio encoder to `g` (precision: fp32 | fp16 | int8 | int4 for the linear weights;
    the two convolutions stay fp32, or fp16-stored under fp16)."""
    _check(cfg)
    a = cfg.audio
    g.input("input_features", TensorProto.FLOAT, ["batch", a.num_mel_bins, "n_frames"])
    g.input("feature_lens", TensorProto.INT64, ["batch"])
    g.output(OUTPUT, TensorProto.FLOAT, ["batch", "n_tokens", cfg.decoder.hidden_size])

    def lin(name: str, x: str, key: str, bias: bool = True) -> str:
        return linear(g, name, x, read(key + ".weight"), read(key + ".bias") if bias else None,
                      precision=precision, block_size=block_size, accuracy_level=accuracy_level,
                      on_error=on_error)

    x, frames = _stem(g, read, precision)
    bias = _attention_bias(g, frames, chunk_frames(cfg))
    for i in range(a.encoder_layers):
        x = _encoder_layer(g, i, x, bias, cfg, read, lin)
    x = layer_norm(g, "/audio/layer_norm", x, read("apm.layer_norm.weight"), read("apm.layer_norm.bias"), LN_EPS)
    out = _project_and_pool(g, x, frames, cfg.audio_pool_step, cfg.decoder.hidden_size, lin)
    g.op("Identity", [out], "/audio/output/Identity", outputs=[OUTPUT])
