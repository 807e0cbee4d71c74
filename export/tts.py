"""The TTS decoder-with-past graph (upstream ConditionalChatTTS: a LlamaModel and four weight-normed
code heads), built from streamed weights in the style of export/decoder.py.

Inputs:  inputs_embeds [1, S, D] f32 (emb_text rows for the condition, summed emb_code rows for audio),
         attention_bias [1, 1, S, total] f32 (additive: 0 or the float32 minimum; upstream's streaming
         mask hides padding and not-yet-unlocked text from the audio positions),
         past_key_values.{i}.key/value [1, H, M, Dh] (past and present bound to one buffer),
         seqlens_k [1] i32 (= total length - 1), total_sequence_length [] i32.
Outputs: logits [1, S, num_vq, 626] f32, present.{i}.key/value (written in place).

One layer is export/decoder.py's without the q/k/v biases (Llama): RMSNorm, fused q|k|v MatMul(NBits),
GroupQueryAttention (rotary, causal, plus the bias), o_proj, residual, RMSNorm, SwiGLU, residual.
The heads: weight_norm folded at export (W = g · v / ‖v‖ per row), the four stacked into one
[num_vq · 626, D] linear whose output is reshaped to [1, S, num_vq, 626].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .decoder import rotary_cache
from .graph import MS_DOMAIN, GraphBuilder
from .ops import ErrorSink, linear, rms_norm, silu_mul, skip_rms_norm
from .tts_config import TTSConfig

ReadWeight = Callable[[str], np.ndarray]
P = "tts.model.layers.{i}."


@dataclass(frozen=True)
class TTSDecoderIO:
    inputs_embeds: str = "inputs_embeds"
    attention_bias: str = "attention_bias"
    seqlens_k: str = "seqlens_k"
    total_sequence_length: str = "total_sequence_length"
    logits: str = "logits"
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"


IO = TTSDecoderIO()


@dataclass(frozen=True)
class LinearSettings:
    precision: str  # fp32 | int8 | int4
    block_size: int
    accuracy_level: int


def folded_heads(read: ReadWeight, cfg: TTSConfig) -> np.ndarray:
    """The four head_code weights with weight_norm applied, stacked: [num_vq * num_audio_tokens, D]."""
    rows = []
    for q in range(cfg.num_vq):
        g = read(f"tts.head_code.{q}.parametrizations.weight.original0").astype(np.float64)
        v = read(f"tts.head_code.{q}.parametrizations.weight.original1").astype(np.float64)
        rows.append(g * v / np.linalg.norm(v, axis=1, keepdims=True))
    return np.concatenate(rows).astype(np.float32)


def _linear(g, name, x, w, lin: LinearSettings, on_error) -> str:
    return linear(g, name, x, w, None, precision=lin.precision, block_size=lin.block_size,
                  accuracy_level=lin.accuracy_level, on_error=on_error)


def _layer(g: GraphBuilder, i: int, n: str, cfg: TTSConfig, read: ReadWeight, lin, on_error, cos, sin) -> str:
    """attention of layer i on the normed stream n; returns its o_proj output."""
    p = P.format(i=i) + "self_attn."
    name = f"/model/layers.{i}/attn"
    w = np.concatenate([read(p + "q_proj.weight"), read(p + "k_proj.weight"), read(p + "v_proj.weight")])
    qkv = _linear(g, f"{name}/qkv_proj", n, w, lin, on_error)
    attn = g.node(
        "GroupQueryAttention",
        [qkv, "", "", IO.past_key.format(i=i), IO.past_value.format(i=i), IO.seqlens_k, IO.total_sequence_length,
         cos, sin, "", IO.attention_bias],
        f"{name}/GroupQueryAttention", domain=MS_DOMAIN,
        outputs=[f"{name}/GroupQueryAttention/output_0", IO.present_key.format(i=i), IO.present_value.format(i=i)],
        num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_attention_heads,
        do_rotary=1, rotary_interleaved=0, scale=float(cfg.head_dim ** -0.5),
    )[0]
    return _linear(g, f"{name}/o_proj", attn, read(p + "o_proj.weight"), lin, on_error)


def _mlp(g: GraphBuilder, i: int, n: str, read: ReadWeight, lin, on_error) -> str:
    p = P.format(i=i) + "mlp."
    name = f"/model/layers.{i}/mlp"
    gu = _linear(g, f"{name}/gate_up_proj", n, np.concatenate([read(p + "gate_proj.weight"),
                                                               read(p + "up_proj.weight")]), lin, on_error)
    return _linear(g, f"{name}/down_proj", silu_mul(g, f"{name}/act", gu), read(p + "down_proj.weight"), lin, on_error)


def _declare_io(g: GraphBuilder, cfg: TTSConfig) -> None:
    f32, kv = TensorProto.FLOAT, [1, cfg.num_attention_heads, "max_cache_len", cfg.head_dim]
    g.input(IO.inputs_embeds, f32, [1, "sequence_length", cfg.hidden_size])
    g.input(IO.attention_bias, f32, [1, 1, "sequence_length", "total_sequence_length"])
    for i in range(cfg.num_hidden_layers):
        g.input(IO.past_key.format(i=i), f32, kv)
        g.input(IO.past_value.format(i=i), f32, kv)
    g.input(IO.seqlens_k, TensorProto.INT32, [1])
    g.input(IO.total_sequence_length, TensorProto.INT32, [])
    g.output(IO.logits, f32, [1, "sequence_length", cfg.num_vq, cfg.num_audio_tokens])
    for i in range(cfg.num_hidden_layers):
        g.output(IO.present_key.format(i=i), f32, kv)
        g.output(IO.present_value.format(i=i), f32, kv)


def build_tts_decoder_graph(g: GraphBuilder, cfg: TTSConfig, read: ReadWeight, lin: LinearSettings,
                            on_error: ErrorSink | None = None) -> None:
    """Add the TTS decoder to `g`, reading (and quantizing) one weight at a time."""
    _declare_io(g, cfg)
    cos_np, sin_np = rotary_cache(cfg, cfg.max_position_embeddings)
    cos = g.initializer("/model/rotary/cos_cache", cos_np)
    sin = g.initializer("/model/rotary/sin_cache", sin_np)
    eps = cfg.rms_norm_eps
    x = IO.inputs_embeds
    n = rms_norm(g, "/model/layers.0/input_layernorm", x, read(P.format(i=0) + "input_layernorm.weight"), eps)
    last = cfg.num_hidden_layers - 1
    for i in range(cfg.num_hidden_layers):
        attn = _layer(g, i, n, cfg, read, lin, on_error, cos, sin)
        n2, x = skip_rms_norm(g, f"/model/layers.{i}/post_attention_layernorm", attn, x,
                              read(P.format(i=i) + "post_attention_layernorm.weight"), eps)
        mlp = _mlp(g, i, n2, read, lin, on_error)
        nxt, wname = ((f"/model/layers.{i + 1}/input_layernorm", P.format(i=i + 1) + "input_layernorm.weight")
                      if i < last else ("/model/norm", "tts.model.norm.weight"))
        n, x = skip_rms_norm(g, nxt, mlp, x, read(wname), eps)
    heads = _linear(g, "/head_code", n, folded_heads(read, cfg), lin, on_error)
    g.op("Reshape", [heads, g.const([1, -1, cfg.num_vq, cfg.num_audio_tokens])], "/head_code/Reshape",
         outputs=[IO.logits])
