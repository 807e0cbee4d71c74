"""Qwen2 decoder-with-past graph, built straight from streamed weights.

Inputs:  inputs_embeds [B, S, D] f32, past_key_values.{i}.key/value [B, Hkv, M, Dh] (M = the
         preallocated cache length; past and present are bound to the same buffer),
         seqlens_k [B] i32 (= each sequence's total length - 1), total_sequence_length [] i32,
         logits_start [1] i64 (where the positions that get logits start, counted from the end:
         -1 for the last one, -(1 + N) when a prompt-lookup step verifies N draft tokens).
Outputs: logits [B, L, V] f32 (the last L = -logits_start positions only: prefill never pays for
         S x V logits),
         present.{i}.key/value (the same buffers, written in place by GroupQueryAttention),
         hidden_states [1, S, D] f32: the final norm's output at every position run, what upstream's
         `output_hidden_states[-1]` gives. Speech reads it once, at the `<|spk|>` position (the
         speaker condition); a run that does not bind it only pays one S x D copy, nothing measurable
         next to a step's weight reads, so every bundle has it.

The compute dtype (`ExportOptions.decoder_dtype`) is that of the KV cache, the activations, the norm
weights and the quantization scales: fp32 for CPUs, fp16 for GPUs. inputs_embeds and logits are f32
either way (cast at the graph's edges), so the runtime feeds and reads both variants alike.
B sequences decode in one call (runtime/scheduler.py): GroupQueryAttention takes each one's length
from seqlens_k (its rotary positions and where its new K/V rows go), so sequences of different
lengths share a step; every other node is per row. The single-sequence runtime feeds B = 1.
`use_int8_kv_cache` turns a built fp32 graph's cache into int8 (static per-channel scales).

One layer (x = residual stream):

    n ─ MatMulNBits(qkv, +bias) ─ GroupQueryAttention(rotary, shared KV buffer) ─ MatMulNBits(o)
                                                                                     │
    x ─────────────────────────────────────────────── SkipSimplifiedLayerNorm ◄───────┘ ─► x, n2
    n2 ─ MatMulNBits(gate|up) ─ silu(gate)·up ─ MatMulNBits(down) ─ SkipSimplifiedLayerNorm(next) ─► x, n

The head (last positions only) is, by default under int4, an int4 MatMulNBits scan whose top 64 logits
are recomputed from int8 rows (ops.rescored_head).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import MS_DOMAIN, NP_TO_ONNX, GraphBuilder
from .hf_config import DecoderConfig
from .imatrix import LayerCalibration, LayerReadCache
from .ops import ErrorSink, linear, rescored_head, rms_norm, silu_mul, skip_rms_norm
from .options import RESCORED_HEADS, ExportOptions

ReadWeight = Callable[[str], np.ndarray]  # name -> float32 array (upstream key names)
P = "llm.model.layers.{i}."


@dataclass(frozen=True)
class DecoderIO:
    inputs_embeds: str = "inputs_embeds"
    seqlens_k: str = "seqlens_k"
    total_sequence_length: str = "total_sequence_length"
    logits_start: str = "logits_start"
    logits: str = "logits"
    hidden_states: str = "hidden_states"
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"


IO = DecoderIO()


def rotary_cache(cfg: DecoderConfig, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [max_positions, head_dim/2] for rotate-half RoPE (HF default inv_freq)."""
    dh = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.int64).astype(np.float32) / dh))
    t = np.arange(max_positions, dtype=np.float32)
    freqs = np.outer(t, inv_freq.astype(np.float32))
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def compute_dtype(opts: ExportOptions) -> np.dtype:
    return np.dtype(np.float16 if opts.decoder_dtype == "fp16" else np.float32)


def _attention(g, i, n, cfg, read, opts, on_error, cos, sin, imp) -> str:
    p = P.format(i=i) + "self_attn."
    w = np.concatenate([read(p + "q_proj.weight"), read(p + "k_proj.weight"), read(p + "v_proj.weight")])
    b = np.concatenate([read(p + "q_proj.bias"), read(p + "k_proj.bias"), read(p + "v_proj.bias")])
    name = f"/model/layers.{i}/attn"
    dt = compute_dtype(opts)
    qkv = _linear(g, f"{name}/qkv_proj", n, w, b, opts, on_error, dt, imp)
    del w
    attn = g.node(
        "GroupQueryAttention",
        [qkv, "", "", IO.past_key.format(i=i), IO.past_value.format(i=i), IO.seqlens_k,
         IO.total_sequence_length, cos, sin],
        f"{name}/GroupQueryAttention", domain=MS_DOMAIN,
        outputs=[f"{name}/GroupQueryAttention/output_0", IO.present_key.format(i=i), IO.present_value.format(i=i)],
        num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_key_value_heads,
        do_rotary=1, rotary_interleaved=0, scale=float(cfg.head_dim ** -0.5),
    )[0]
    return _linear(g, f"{name}/o_proj", attn, read(p + "o_proj.weight"), None, opts, on_error, dt, imp)


def _linear(g, name, x, w, b, opts: ExportOptions, on_error, dt, imp: dict) -> str:
    """One decoder linear layer at its precision and accuracy level (ExportOptions.linear_settings),
    its range search weighted by the calibration's importance of its inputs when there is one."""
    precision, level = opts.linear_settings(name)
    return linear(g, name, x, w, b, precision=precision, block_size=opts.block_size, accuracy_level=level,
                  on_error=on_error, dtype=dt, importance=imp.get(name.split("/", 3)[-1]))


def use_int8_kv_cache(model: onnx.ModelProto, k_scales: Sequence[np.ndarray], v_scales: Sequence[np.ndarray]) -> None:
    """Switch every layer's KV cache of a built fp32 decoder to int8, in place (the graph only: the
    weights' external data file is untouched).

    ORT's CPU GroupQueryAttention then quantizes each new K/V row as round(x / scale) clamped to
    [-128, 127] and dequantizes in its attention loop; scales are per layer, KV head and channel,
    [1, kv_heads, 1, head_dim], and enter as inputs 12 and 13 (after position_ids, attention_bias and
    head_sink, unused here).
    """
    layers = len(k_scales)
    kv_names = {n.format(i=i) for i in range(layers)
                for n in (IO.past_key, IO.past_value, IO.present_key, IO.present_value)}
    for v in (*model.graph.input, *model.graph.output):
        if v.name in kv_names:
            v.type.tensor_type.elem_type = TensorProto.INT8
    by_name = {n.name: n for n in model.graph.node}
    for i in range(layers):
        node = by_name[f"/model/layers.{i}/attn/GroupQueryAttention"]
        names = []
        for kind, scale in (("k", k_scales[i]), ("v", v_scales[i])):
            name = f"/model/layers.{i}/attn/{kind}_scale"
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(scale, np.float32), name))
            names.append(name)
        del node.input[9:]
        node.input.extend(["", "", "", *names])
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])


def _mlp(g, i, n, read, opts, on_error, imp) -> str:
    p = P.format(i=i) + "mlp."
    name = f"/model/layers.{i}/mlp"
    dt = compute_dtype(opts)
    w = np.concatenate([read(p + "gate_proj.weight"), read(p + "up_proj.weight")])
    gu = _linear(g, f"{name}/gate_up_proj", n, w, None, opts, on_error, dt, imp)
    del w
    h = silu_mul(g, f"{name}/act", gu)
    return _linear(g, f"{name}/down_proj", h, read(p + "down_proj.weight"), None, opts, on_error, dt, imp)


def _declare_io(g: GraphBuilder, cfg: DecoderConfig, dt: np.dtype) -> None:
    f32, kv = TensorProto.FLOAT, ["batch_size", cfg.num_key_value_heads, "max_cache_len", cfg.head_dim]
    kv_type = NP_TO_ONNX[dt]
    g.input(IO.inputs_embeds, f32, ["batch_size", "sequence_length", cfg.hidden_size])
    for i in range(cfg.num_hidden_layers):
        g.input(IO.past_key.format(i=i), kv_type, kv)
        g.input(IO.past_value.format(i=i), kv_type, kv)
    g.input(IO.seqlens_k, TensorProto.INT32, ["batch_size"])
    g.input(IO.total_sequence_length, TensorProto.INT32, [])
    g.input(IO.logits_start, TensorProto.INT64, [1])
    g.output(IO.logits, f32, ["batch_size", "logits_length", cfg.vocab_size])
    g.output(IO.hidden_states, f32, ["batch_size", "sequence_length", cfg.hidden_size])
    for i in range(cfg.num_hidden_layers):
        g.output(IO.present_key.format(i=i), kv_type, kv)
        g.output(IO.present_value.format(i=i), kv_type, kv)


def build_decoder_graph(g: GraphBuilder, cfg: DecoderConfig, read: ReadWeight, opts: ExportOptions,
                        max_positions: int, on_error: ErrorSink | None = None,
                        progress: Callable[[int, int], None] | None = None,
                        calibration: Sequence[np.ndarray] | None = None) -> None:
    """Add the whole decoder to `g`, reading and quantizing one weight at a time. `calibration`: token
    id sequences whose activations weight the quantizer (export/imatrix.py)."""
    dt = compute_dtype(opts)
    calib = None
    if calibration is not None:
        read = LayerReadCache(read)
        calib = LayerCalibration(cfg, read, calibration)
    _declare_io(g, cfg, dt)
    cos_np, sin_np = rotary_cache(cfg, max_positions)
    cos = g.initializer("/model/rotary/cos_cache", cos_np.astype(dt))
    sin = g.initializer("/model/rotary/sin_cache", sin_np.astype(dt))
    eps = cfg.rms_norm_eps
    x = IO.inputs_embeds
    if dt != np.float32:
        x = g.op("Cast", [x], "/model/inputs_embeds/Cast", to=NP_TO_ONNX[dt])
    n = rms_norm(g, "/model/layers.0/input_layernorm", x, read(P.format(i=0) + "input_layernorm.weight"), eps,
                 dtype=dt)
    last = cfg.num_hidden_layers - 1
    for i in range(cfg.num_hidden_layers):
        imp = {}
        if calib is not None:
            read.start_layer(i)
            imp = calib.advance(i)
        attn = _attention(g, i, n, cfg, read, opts, on_error, cos, sin, imp)
        n2, x = skip_rms_norm(g, f"/model/layers.{i}/post_attention_layernorm", attn, x,
                              read(P.format(i=i) + "post_attention_layernorm.weight"), eps, dtype=dt)
        mlp = _mlp(g, i, n2, read, opts, on_error, imp)
        if i < last:
            n, x = skip_rms_norm(g, f"/model/layers.{i + 1}/input_layernorm", mlp, x,
                                 read(P.format(i=i + 1) + "input_layernorm.weight"), eps, dtype=dt)
        else:
            n, x = skip_rms_norm(g, "/model/norm", mlp, x, read("llm.model.norm.weight"), eps, dtype=dt)
        if progress:
            progress(i + 1, cfg.num_hidden_layers)
    hidden = n if dt == np.float32 else g.op("Cast", [n], "/model/hidden_states/Cast", to=TensorProto.FLOAT)
    g.op("Identity", [hidden], "/model/hidden_states/Identity", outputs=[IO.hidden_states])
    # Only the last positions' logits are needed (one, or the ones a draft is verified at): slice before
    # the (vocab-sized) head. The start is a graph input, not computed from a count: Slice reads starts
    # on the CPU, and a node computing them would run there too, which a CUDA graph does not allow.
    last_pos = g.op("Slice", [n, IO.logits_start, g.const([2**62]), g.const([1])], "/model/last_positions/Slice")
    head_name = "llm.model.embed_tokens.weight" if cfg.tie_word_embeddings else "llm.lm_head.weight"
    head_imp = calib.head_importance() if calib is not None else None
    if opts.head_precision in RESCORED_HEADS:
        logits = rescored_head(g, "/lm_head", last_pos, read(head_name), scan_bits=RESCORED_HEADS[opts.head_precision],
                               block_size=opts.block_size, accuracy_level=opts.accuracy_level, on_error=on_error,
                               dtype=dt, importance=head_imp)
    else:
        logits = linear(g, "/lm_head", last_pos, read(head_name), None, precision=opts.head_precision,
                        block_size=opts.block_size, accuracy_level=opts.accuracy_level, on_error=on_error, dtype=dt,
                        importance=head_imp)
    if dt != np.float32:
        g.op("Cast", [logits], "/model/logits/Cast", outputs=[IO.logits], to=TensorProto.FLOAT)
    else:
        g.op("Identity", [logits], "/model/logits/Identity", outputs=[IO.logits])
