"""Vision graph: NaViT-SigLIP encoder + perceiver resampler, any number of slices of any size.

Inputs (made by the runtime's numpy preprocessing, as upstream's processor does):
  pixel_values          [n, 3, P, L*P] f32  each slice as a strip of its L patches, zero-padded
  patch_attention_mask  [n, L] bool         True for the h*w real patches of each slice
  position_ids          [n, L] i64          NaViT bucketed position ids (0 at padding)
  tgt_sizes             [n, 2] i64          (h, w) patches per slice
Output:
  image_embeds          [n, 64, D] f32      one 64-token block per slice

    strips ─ patchify(Reshape/Transpose) ─ MatMul(patch_embedding) ─ + pos_emb[position_ids]
      └─ N × [LN ─ MHA(key-padding bias) ─ + ─ LN ─ fc1 ─ gelu_tanh ─ fc2 ─ +] ─ post_layernorm
      └─ resampler: kv_proj ─ LN_kv ─┬─ + sincos(x, y from tgt_sizes) ─ K
                                    └─────────────────────────────────── V
         Q = in_proj_q(LN_q(query)) is a constant folded at export ─ MHA ─ out_proj ─ LN_post ─ @ proj
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnx import TensorProto

from .graph import GraphBuilder
from .hf_config import MiniCPMOConfig
from .ops import ErrorSink, layer_norm, linear, merge_heads, sdpa, split_heads

ReadWeight = Callable[[str], np.ndarray]
INPUTS = ("pixel_values", "patch_attention_mask", "position_ids", "tgt_sizes")
OUTPUT = "image_embeds"


def sincos_omega(dim: int) -> np.ndarray:
    """Frequencies of upstream's get_1d_sincos_pos_embed_from_grid_new for a dim-wide half, in float32."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    return (1.0 / 10000**omega).astype(np.float32)


def _key_padding_bias(g: GraphBuilder, name: str, mask: str) -> str:
    """bool [n, L] -> additive f32 bias [n, 1, 1, L]: 0 on real patches, finfo.min on padding."""
    neg = g.const(np.float32(np.finfo(np.float32).min), np.float32)
    zero = g.const(np.float32(0.0), np.float32)
    bias = g.op("Where", [mask, zero, neg], f"{name}/Where")
    return g.op("Unsqueeze", [bias, g.const([1, 2])], f"{name}/Unsqueeze")


def _patch_embed(g, cfg: MiniCPMOConfig, read: ReadWeight, prec: str) -> str:
    v = cfg.vision
    p = v.patch_size
    # [n, 3, P, L*P] -> [n, 3, P, L, P] -> [n, L, 3, P, P] -> [n, L, 3*P*P]; Conv2d(k=s=P) == this MatMul.
    x = g.op("Reshape", ["pixel_values", g.const([0, 3, p, -1, p])], "/vision/patchify/Reshape")
    x = g.op("Transpose", [x], "/vision/patchify/Transpose", perm=[0, 3, 1, 2, 4])
    x = g.op("Reshape", [x, g.const([0, 0, 3 * p * p])], "/vision/patchify/Flatten")
    w = read("vpm.embeddings.patch_embedding.weight").reshape(v.hidden_size, 3 * p * p)
    x = linear(g, "/vision/patch_embedding", x, w, read("vpm.embeddings.patch_embedding.bias"),
               precision="fp32" if prec == "int8" else prec)  # K=588 is not a multiple of the blocks
    table = g.initializer("/vision/position_embedding/weight",
                          read("vpm.embeddings.position_embedding.weight").astype(np.float32))
    pos = g.op("Gather", [table, "position_ids"], "/vision/position_embedding/Gather", axis=0)
    return g.op("Add", [x, pos], "/vision/embeddings/Add")


def _encoder_layer(g, i, x, bias, cfg, read, lin, on_error) -> str:
    v = cfg.vision
    pre, name = f"vpm.encoder.layers.{i}.", f"/vision/layers.{i}"
    h = layer_norm(g, f"{name}/layer_norm1", x, read(pre + "layer_norm1.weight"),
                   read(pre + "layer_norm1.bias"), v.layer_norm_eps)
    heads = [split_heads(g, f"{name}/attn/{t}", lin(f"{name}/attn/{t}_proj", h, pre + f"self_attn.{t}_proj"),
                         v.num_attention_heads, v.head_dim) for t in ("q", "k", "v")]
    a = sdpa(g, f"{name}/attn", *heads, bias, v.head_dim ** -0.5)
    a = lin(f"{name}/attn/out_proj", merge_heads(g, f"{name}/attn/merge", a, v.hidden_size),
            pre + "self_attn.out_proj")
    x = g.op("Add", [x, a], f"{name}/attn/residual")
    h = layer_norm(g, f"{name}/layer_norm2", x, read(pre + "layer_norm2.weight"),
                   read(pre + "layer_norm2.bias"), v.layer_norm_eps)
    h = lin(f"{name}/mlp/fc1", h, pre + "mlp.fc1")
    h = g.op("Gelu", [h], f"{name}/mlp/Gelu", approximate="tanh")
    h = lin(f"{name}/mlp/fc2", h, pre + "mlp.fc2")
    return g.op("Add", [x, h], f"{name}/mlp/residual")


def _sincos_pos(g, cfg: MiniCPMOConfig, length_like: str) -> str:
    """Resampler 2-D sin-cos embedding of each patch, from its (x, y) = (p mod w, p div w): [n, L, D]."""
    n = "/resampler/pos"
    shape = g.op("Shape", [length_like], f"{n}/Shape")
    seq = g.op("Gather", [shape, g.const(1)], f"{n}/L", axis=0)
    p = g.op("Range", [g.const(0), seq, g.const(1)], f"{n}/Range")  # [L]
    w = g.op("Slice", ["tgt_sizes", g.const([1]), g.const([2]), g.const([1])], f"{n}/w")  # [n, 1]
    xs = g.op("Cast", [g.op("Mod", [p, w], f"{n}/Mod")], f"{n}/x", to=TensorProto.FLOAT)  # [n, L]
    ys = g.op("Cast", [g.op("Div", [p, w], f"{n}/Div")], f"{n}/y", to=TensorProto.FLOAT)
    omega = g.initializer(f"{n}/omega", sincos_omega(cfg.decoder.hidden_size // 2))
    parts = []
    for axis, coord in (("x", xs), ("y", ys)):  # upstream: the width coordinate comes first
        ang = g.op("Mul", [g.op("Unsqueeze", [coord, g.const([2])], f"{n}/{axis}/Unsqueeze"), omega],
                   f"{n}/{axis}/Mul")
        parts += [g.op("Sin", [ang], f"{n}/{axis}/Sin"), g.op("Cos", [ang], f"{n}/{axis}/Cos")]
    return g.op("Concat", parts, f"{n}/Concat", axis=-1)


def _resampler(g, x, bias, cfg: MiniCPMOConfig, read: ReadWeight, lin, prec: str) -> str:
    d, heads = cfg.decoder.hidden_size, cfg.resampler_heads
    ln = lambda nm, t: layer_norm(g, f"/resampler/{nm}", t, read(f"resampler.{nm}.weight"),  # noqa: E731
                                  read(f"resampler.{nm}.bias"), 1e-6)
    kv = ln("ln_kv", linear(g, "/resampler/kv_proj", x, read("resampler.kv_proj.weight"), None,
                            precision=prec))
    w_in, b_in = read("resampler.attn.in_proj_weight"), read("resampler.attn.in_proj_bias")
    # The query path depends on weights only: fold LN_q and the q projection into one constant.
    q = _layer_norm_np(read("resampler.query"), read("resampler.ln_q.weight"), read("resampler.ln_q.bias"))
    q = (q @ w_in[:d].T + b_in[:d]).astype(np.float32)  # [64, D]
    q = g.initializer("/resampler/attn/q_folded", q.reshape(1, -1, heads, d // heads).transpose(0, 2, 1, 3))
    key_in = g.op("Add", [kv, _sincos_pos(g, cfg, kv)], "/resampler/key_in")
    k = linear(g, "/resampler/attn/k_proj", key_in, w_in[d:2 * d], b_in[d:2 * d], precision=prec)
    v = linear(g, "/resampler/attn/v_proj", kv, w_in[2 * d:], b_in[2 * d:], precision=prec)
    k, v = (split_heads(g, f"/resampler/attn/{t}", y, heads, d // heads) for t, y in (("k", k), ("v", v)))
    a = merge_heads(g, "/resampler/attn/merge", sdpa(g, "/resampler/attn", q, k, v, bias, (d // heads) ** -0.5), d)
    a = linear(g, "/resampler/attn/out_proj", a, read("resampler.attn.out_proj.weight"),
               read("resampler.attn.out_proj.bias"), precision=prec)
    a = ln("ln_post", a)
    # upstream computes x @ proj (proj is [D_in, D_out]), i.e. a Linear whose weight is proj.T
    return linear(g, "/resampler/proj", a, np.ascontiguousarray(read("resampler.proj").T), None, precision=prec)


def _layer_norm_np(x, w, b, eps=1e-6):
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def build_vision_graph(g: GraphBuilder, cfg: MiniCPMOConfig, read: ReadWeight, precision: str,
                       block_size: int = 32, accuracy_level: int = 4,
                       on_error: ErrorSink | None = None) -> None:
    """Add the vision encoder and the resampler to `g` (precision: fp32 | fp16 | int8 weights)."""
    v, p = cfg.vision, cfg.vision.patch_size
    g.input("pixel_values", TensorProto.FLOAT, ["n_slices", 3, p, "strip_width"])
    g.input("patch_attention_mask", TensorProto.BOOL, ["n_slices", "n_patches"])
    g.input("position_ids", TensorProto.INT64, ["n_slices", "n_patches"])
    g.input("tgt_sizes", TensorProto.INT64, ["n_slices", 2])
    g.output(OUTPUT, TensorProto.FLOAT, ["n_slices", cfg.slicing.query_num, cfg.decoder.hidden_size])

    def lin(name: str, x: str, key: str) -> str:
        return linear(g, name, x, read(key + ".weight"), read(key + ".bias"), precision=precision,
                      block_size=block_size, accuracy_level=accuracy_level, on_error=on_error)

    bias = _key_padding_bias(g, "/vision/key_padding", "patch_attention_mask")
    x = _patch_embed(g, cfg, read, precision)
    for i in range(cfg.vision_layers_used):
        x = _encoder_layer(g, i, x, bias, cfg, read, lin, on_error)
    x = layer_norm(g, "/vision/post_layernorm", x, read("vpm.post_layernorm.weight"),
                   read("vpm.post_layernorm.bias"), v.layer_norm_eps)
    out = _resampler(g, x, bias, cfg, read, lin, precision)
    g.op("Identity", [out], "/vision/output/Identity", outputs=[OUTPUT])
